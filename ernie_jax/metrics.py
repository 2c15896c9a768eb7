"""Metrics: MoE-aware model FLOPs and MFU, metrics.jsonl + TensorBoard writers, console progress."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid

import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax.config import Config, LogConfig
from ernie_jax.errors import ConfigError
from ernie_jax.paths import AppendFile, as_path, is_remote, join, write_atomic
from ernie_jax.summary import count_params

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
}


def train_flops_per_token(cfg: Config, seq_len: int) -> float:
    """6 x active matmul params (routed experts at top_k/E, embedding lookup excluded, LM head
    included) + causal attention 6 * L * S * N * D (QK^T and PV, fwd+bwd, halved for causality)."""
    counts = count_params(cfg)
    matmul = counts["active"] - counts["embedding"] - counts["norms"]
    if cfg.model.tie_word_embeddings:
        matmul += counts["embedding"]  # the tied matrix still does the LM-head matmul
    m = cfg.model
    attention = 6.0 * m.num_layers * seq_len * m.num_heads * m.head_dim
    mtp = 6.0 * counts["mtp"] if m.mtp_depth else 0.0
    return 6.0 * matmul + attention + mtp


def measure_cpu_peak(dtype=jnp.float32, n: int = 2048) -> float:
    """Best-of-3 FLOP/s of an n^3 matmul on the default device (the CPU 'peak' for MFU)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def device_peak_flops(dtype=jnp.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number came from)."""
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "")
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_FLOPS[name], f"{kind} spec sheet"
    return measure_cpu_peak(dtype), f"{kind or dev.platform} measured matmul"


def _drop_rows_after(path: str, step: int, superseded: str) -> None:
    """Keep the rows of `path` up to `step`; the later ones are appended to `superseded`."""
    if not as_path(path).exists():
        return
    keep, later = [], []
    for line in as_path(path).read_text().splitlines(keepends=True):
        try:
            (keep if json.loads(line).get("step", 0) <= step else later).append(line)
        except ValueError:  # a line cut by a crash mid-write
            later.append(line if line.endswith("\n") else line + "\n")
    if not later:
        return
    aside = AppendFile(superseded)
    aside.write("".join(later))
    aside.close()
    write_atomic(path, "".join(keep))


class MetricsWriter:
    """metrics.jsonl (one object per logged step), TensorBoard events under tb/ and, with
    log.wandb_project, a Weights & Biases run; only process 0 writes. The resolved config goes to
    TensorBoard (text) and W&B (the run's config)."""

    def __init__(
        self,
        workdir: str,
        log: LogConfig,
        resume_step: int | None = None,
        config: dict | None = None,
        run_name: str = "",
    ):
        """`resume_step`: the logged step this run continues from; rows past it (written after the
        checkpoint it resumes from) move to metrics.superseded.jsonl, so each step appears once."""
        self.enabled = jax.process_index() == 0
        self._tb = self._wandb = None
        if not self.enabled:
            return
        path = join(workdir, "metrics.jsonl")
        if resume_step is not None:
            _drop_rows_after(path, resume_step, join(workdir, "metrics.superseded.jsonl"))
        self._jsonl = AppendFile(path)
        self._samples_path = join(workdir, "samples.jsonl")
        if resume_step is not None:
            _drop_rows_after(self._samples_path, resume_step, join(workdir, "samples.superseded.jsonl"))
        self._samples = None  # opened at the first sample
        if log.tensorboard:
            from tensorboardX import SummaryWriter  # optional heavy dependency, imported when used

            self._tb = SummaryWriter(join(workdir, "tb"))
            if config is not None:
                self._tb.add_text(
                    "config", "```\n" + json.dumps(config, indent=1) + "\n```", resume_step or 0
                )
        if log.wandb_project:
            self._wandb = open_wandb_run(workdir, log, config, run_name)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        scalars = {}
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                scalars[k] = v
            elif isinstance(v, list):
                scalars.update({f"{k}/layer{i}": x for i, x in enumerate(v)})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))

    def write_samples(self, step: int, rows: list[dict]) -> None:
        """Sampled completions: one samples.jsonl row each, and one TensorBoard text entry per step."""
        if not self.enabled or not rows:
            return
        if self._samples is None:
            self._samples = AppendFile(self._samples_path)
        self._samples.write(
            "".join(json.dumps({"step": int(step), **r}, ensure_ascii=False) + "\n" for r in rows)
        )
        if self._tb is not None:
            text = "\n\n".join(f"**{r['prompt']}** {r['completion']}" for r in rows)
            self._tb.add_text("samples", text, step)

    def close(self) -> None:
        if self.enabled:
            if self._samples is not None:
                self._samples.close()
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()


WANDB_ID_FILE = "wandb_run_id"


def open_wandb_run(workdir: str, log: LogConfig, config: dict | None, run_name: str):
    """A W&B run for this workdir: its id is kept in <workdir>/wandb_run_id, so a resumed run (or the
    next stage of a recipe) continues the same W&B run instead of starting a new one."""
    try:
        import wandb  # optional dependency: pip install -e '.[wandb]'
    except ImportError:
        raise ConfigError(
            f"log.wandb_project={log.wandb_project!r} needs the wandb package: "
            f"pip install -e '.[wandb]' (or set log.wandb_project='')"
        ) from None
    id_path = as_path(join(workdir, WANDB_ID_FILE))
    if id_path.exists():
        run_id = id_path.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_path.write_text(run_id)
    # wandb keeps its own files in a local directory: the workdir when local, its default otherwise
    return wandb.init(
        project=log.wandb_project,
        entity=log.wandb_entity or None,
        id=run_id,
        resume="allow",
        name=log.wandb_run_name or run_name or None,
        dir=None if is_remote(workdir) else workdir,
        config=config,
        allow_val_change=True,
    )


def _jsonable(v):
    if isinstance(v, str):
        return v
    a = np.asarray(v)
    if a.ndim == 0:
        x = a.item()
        return round(x, 6) if isinstance(x, float) else x
    return [round(float(x), 6) for x in a.reshape(-1)]


class Console:
    """What a person watches: progress lines with step, loss, tokens/s, MFU, ETA. Silent when quiet."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet or jax.process_index() != 0

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, flush=True)

    def progress(self, step: int, total: int, m: dict, eta_s: float) -> None:
        if self.quiet:
            return
        width = 20
        done = int(width * step / max(total, 1))
        bar = "#" * done + "." * (width - done)
        parts = [f"[{bar}] {step}/{total}"]
        parts += (
            [f"loss {m['loss']:.4f}", f"lm {m['lm_loss']:.4f}"] if "loss" in m else ["every step skipped"]
        )
        if "reward" in m:  # on-policy RL: the sampled answers' mean reward
            parts.append(f"reward {m['reward']:.3f}")
        if "tokens_per_s" in m:
            parts.append(f"{m['tokens_per_s']:.0f} tok/s")
        if "mfu" in m:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        parts.append(f"ETA {_hms(eta_s)}")
        print("  ".join(parts), file=sys.stdout, flush=True)


def _hms(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
