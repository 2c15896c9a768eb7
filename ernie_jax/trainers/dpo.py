"""Direct preference optimisation on the shared loop (after PaddlePaddle/ERNIE ernie/loss/dpo.py and
erniekit/hparams/finetuning_args.py).

Data: JSONL pairs {"prompt": str | "messages": [...], "chosen": str | message, "rejected": ..., "images"}.
Each pair is one packed item: prompt + chosen, then prompt + rejected, as two attention segments
(odd / even segment ids), each with its own positions; only response tokens carry loss.

Loss per pair from summed response log-probs (optionally length-normalised as ERNIEKit does),
z = (log pi_c - log pi_r) - (log ref_c - log ref_r):
  sigmoid: -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
  ipo:     (z' - 1 / (2 beta))^2 with z' from per-token average log-probs
  hinge:   max(0, 1 - beta z)
  simpo:   -log sigmoid(beta z - gamma), z from per-token average log-probs, no reference (Meng et al. 2024)
  dpop:    sigmoid on z - lambda max(0, log ref_c - log pi_c) (DPO-Positive, Pal et al. 2024)
  offset_alpha > 0 (sigmoid): -log sigmoid(beta z - alpha log(score_c - score_r)) for pairs with a
  positive score gap (ODPO, Amini et al. 2024); reference_free: the reference log-probs count as 0.
plus sft_loss_ratio x NLL of the chosen response. Reference log-probs come either from a frozen copy
of the starting policy (`dpo.reference: copy`, `ref_params` in the train state) or from one pass over
the data before training, cached in the workdir (`cached`).
"""

from __future__ import annotations

import io
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax.config import Config
from ernie_jax.data.chat import EMBEDDED_PREFERENCE, ChatError, markers, render_answer, render_prompt
from ernie_jax.data.multimodal import (
    MultimodalStats,
    SampleEncoder,
    _row_inputs,
    check_eval_batches,
    load_multimodal,
    packed_multimodal_batches,
    read_jsonl,
)
from ernie_jax.errors import CheckpointError
from ernie_jax.model.ernie import router_loss_total
from ernie_jax.parallel.mesh import place_batch
from ernie_jax.paths import as_path, join, write_atomic
from ernie_jax.trainers.lm import token_nll
from ernie_jax.trainers.state import model_of
from ernie_jax.trainers.task import EvalReport, Task

CACHE_FILE = "reference_logps.npz"


def read_preferences(source: str):
    counter = iter(range(1 << 62))

    def parse(base, obj):
        prompt = obj.get("messages") or [{"role": "user", "content": obj["prompt"]}]
        if not isinstance(prompt, list):
            raise ValueError
        chosen, rejected, images = obj["chosen"], obj["rejected"], list(obj.get("images") or [])
        gap = float(obj.get("chosen_score", 0.0)) - float(obj.get("rejected_score", 0.0))
        return next(counter), base, prompt, chosen, rejected, images, gap  # ids 0..n-1 over usable lines

    return read_jsonl(source, EMBEDDED_PREFERENCE, parse)


class PairEncoder:
    """One preference pair -> one packable item (chosen part 1, rejected part 2), or None."""

    def __init__(self, cfg: Config, tokenizer, stats: MultimodalStats, max_patches_row: int, cache=None):
        self.cfg, self.stats, self.cache = cfg, stats, cache
        self.mode = cfg.data.chat_mode
        self.begin, self.end = markers(tokenizer)
        self.encode = SampleEncoder(cfg, tokenizer, stats, max_patches_row)

    def __call__(self, item):
        ex_id, base, prompt, chosen, rejected, images, gap = item
        if chosen == rejected:
            self.stats.add("same_pair")
            return None
        try:
            head = render_prompt(prompt, self.mode, self.begin, images)
            answers = [head + render_answer(ans, self.mode, self.end) for ans in (chosen, rejected)]
        except ChatError as e:
            self.stats.add(e.reason)
            return None
        parts = []
        for segs in answers:  # stop at the first unusable part: one skip is counted once
            parts.append(self.encode((base, segs, False)))
            if parts[-1] is None:
                return None
        n = sum(len(p["tokens"]) for p in parts)
        if n > self.cfg.data.seq_len + 1:
            self.stats.add("too_long")
            return None
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out["part"] = np.concatenate(
            [np.full(len(p["tokens"]), i + 1, np.int32) for i, p in enumerate(parts)]
        )
        out["example"] = np.full(n, ex_id, np.int32)
        ref = np.zeros(n, np.float32)
        score_gap = np.zeros(n, np.float32)
        score_gap[int(np.argmax(parts[0]["targets"][1:] > 0)) + 1] = gap  # on the chosen part's first target
        out["gap"] = score_gap
        if self.cache is not None:  # the cached pair sums sit on each part's first target token
            offset = 0
            for i, p in enumerate(parts):
                first = offset + int(np.argmax(p["targets"][1:] > 0)) + 1
                ref[first] = self.cache[ex_id, i]
                offset += len(p["tokens"])
        out["ref"] = ref
        return out


def pair_row_inputs(ex: dict) -> dict:
    """Packed pairs -> model inputs; chosen and rejected of sample k get segments 2k-1 and 2k."""
    seg = ex["tokens_segment_ids"]
    seg2 = np.where(seg > 0, 2 * seg - 2 + ex["part"], 0).astype(np.int32)
    out = _row_inputs({**ex, "tokens_segment_ids": seg2})
    out["ref_logp"] = ex["ref"][1:].astype(np.float32)
    out["score_gap"] = ex["gap"][1:].astype(np.float32)
    out["example"] = ex["example"][:-1]
    return out


class Pair(NamedTuple):
    """One value per preference pair for each side, [B, K] each."""

    chosen: jax.Array
    rejected: jax.Array


def pair_sums(values: jax.Array, segment_ids: jax.Array) -> Pair:
    """Per-token values [B,S] -> (chosen sums, rejected sums) [B, K] by segment (2k-1, 2k)."""
    b, s = values.shape
    ids = (jnp.arange(b)[:, None] * s + segment_ids).reshape(-1)
    sums = jax.ops.segment_sum(values.reshape(-1), ids, num_segments=b * s).reshape(b, s)
    k = (s - 1) // 2
    return Pair(sums[:, 1 : 2 * k + 1 : 2], sums[:, 2 : 2 * k + 2 : 2])


def preference_loss(
    z: jax.Array, beta: float, loss_type: str, label_smoothing: float, offset: jax.Array | float = 0.0
) -> jax.Array:
    """The loss of a pair from its margin z; `offset` is subtracted from beta z (SimPO's gamma, the
    score-based offset)."""
    if loss_type == "ipo":
        return (z - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * z)
    x = beta * z - offset
    return -(1 - label_smoothing) * jax.nn.log_sigmoid(x) - label_smoothing * jax.nn.log_sigmoid(-x)


def dpo_objective(out, batch: dict, cfg: Config) -> tuple[jax.Array, dict]:
    d = cfg.dpo
    mask = batch["loss_mask"].astype(jnp.float32)
    logp = -token_nll(out, batch["labels"]) * mask
    ref = batch.get("ref_logp", jnp.zeros_like(logp)) * mask
    seg = batch["segment_ids"]
    policy, reference, length = pair_sums(logp, seg), pair_sums(ref, seg), pair_sums(mask, seg)
    valid = ((length.chosen > 0) & (length.rejected > 0)).astype(jnp.float32)
    safe = Pair(jnp.maximum(length.chosen, 1.0), jnp.maximum(length.rejected, 1.0))

    def compared(logps: Pair) -> Pair:
        """The log-prob sums the loss compares: per token (IPO), scaled to the pair's mean response
        length (ERNIEKit's normalisation) or as they are."""
        if d.loss_type in ("ipo", "simpo"):
            return Pair(logps.chosen / safe.chosen, logps.rejected / safe.rejected)
        if d.normalize_logps:
            mean_len = (length.chosen + length.rejected) / 2
            return Pair(logps.chosen * mean_len / safe.chosen, logps.rejected * mean_len / safe.rejected)
        return logps

    pol, refc = compared(policy), compared(reference)
    if d.reference_free or d.loss_type == "simpo":  # no reference model (SimPO is reference-free)
        refc = Pair(jnp.zeros_like(pol.chosen), jnp.zeros_like(pol.rejected))
    z = (pol.chosen - pol.rejected) - (refc.chosen - refc.rejected)
    if d.loss_type == "dpop":  # Pal et al. 2024: penalise the chosen response falling below the reference
        z = z - d.dpop_lambda * jax.nn.relu(refc.chosen - pol.chosen)
    offset = d.simpo_gamma if d.loss_type == "simpo" else 0.0
    if d.offset_alpha:  # ODPO (Amini et al. 2024): a larger score gap asks for a larger margin
        gap = pair_sums(batch["score_gap"], seg).chosen
        offset = jnp.where(gap > 0, d.offset_alpha * jnp.log(jnp.maximum(gap, 1e-12)), 0.0)
    pairs = jnp.maximum(valid.sum(), 1.0)
    kind = "sigmoid" if d.loss_type in ("simpo", "dpop") else d.loss_type
    pref = jnp.sum(preference_loss(z, d.beta, kind, d.label_smoothing, offset) * valid) / pairs
    chosen_tokens = jnp.maximum(jnp.sum(length.chosen * valid), 1.0)
    sft = -jnp.sum(policy.chosen * valid) / chosen_tokens
    router = router_loss_total(out, cfg.moe)
    total = d.pref_loss_ratio * pref + d.sft_loss_ratio * sft + router
    reward_c, reward_r = d.beta * (pol.chosen - refc.chosen), d.beta * (pol.rejected - refc.rejected)
    response_tokens = jnp.maximum(jnp.sum((length.chosen + length.rejected) * valid), 1.0)
    metrics = {
        "loss": total,
        "dpo_loss": pref,
        "router_loss": router,
        **out.router_losses,
        "lm_loss": sft,
        "tokens": jnp.sum(length.chosen * valid),  # chosen-response NLL (eval reports its ppl)
        "reward_chosen": jnp.sum(reward_c * valid) / pairs,
        "reward_rejected": jnp.sum(reward_r * valid) / pairs,
        "reward_accuracy": jnp.sum((reward_c > reward_r) * valid) / pairs,
        "reward_margin": jnp.sum((reward_c - reward_r) * valid) / pairs,
        "kl_proxy": jnp.sum(
            ((reference.chosen + reference.rejected) - (policy.chosen + policy.rejected)) * valid
        )
        / response_tokens,  # mean log(ref / policy) per token
        "pairs": valid.sum(),
    }
    if out.dropped_fraction is not None:
        metrics["dropped_fraction"] = out.dropped_fraction
    return total, metrics


def reference_logps(ref_out, batch) -> jax.Array:
    """Per-token log-probs of the labels under the reference model (no gradient)."""
    return jax.lax.stop_gradient(-token_nll(ref_out, batch["labels"]))


class DPOTask:
    """Builds its iterators after the model exists: with `dpo.reference: cached` the reference pass
    needs the starting params."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.data = load_multimodal(cfg, reader=read_preferences)
        self.per_row = (
            cfg.data.max_patches // cfg.data.batch_size if cfg.vision.enabled else cfg.vision.spatial_merge**2
        )
        self.cache = None
        self.batches(self.data.train, cfg.data.shuffle_seed, True)  # both splits checked before any compute
        if len(self.data.eval):
            check_eval_batches(
                self.batches(self.data.eval, 1, False, split="eval"),
                len(self.data.eval),
                cfg,
                self.data.stats,
            )

    def batches(self, samples, seed: int, repeat: bool, cache=None, split: str = "train"):
        enc = PairEncoder(self.cfg, self.data.tokenizer, self.data.stats, self.per_row, cache)
        return packed_multimodal_batches(
            samples,
            self.data.tokenizer,
            self.cfg,
            self.data.stats,
            seed=seed,
            repeat=repeat,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            encoder=enc,
            row_inputs=pair_row_inputs,
            split=split,
            extra_lengths={
                "part": self.cfg.data.seq_len + 1,
                "example": self.cfg.data.seq_len + 1,
                "ref": self.cfg.data.seq_len + 1,
                "gap": self.cfg.data.seq_len + 1,
            },
        )

    def prepare(self, graphdef, state, mesh, workdir: str, fresh: bool) -> dict:
        """The Task's iterators; with a cached reference, first compute (fresh run) or load the
        per-pair reference log-prob sums they carry."""
        d = self.cfg.dpo
        if d.reference == "cached" and not (d.reference_free or d.loss_type == "simpo"):
            path = join(workdir, CACHE_FILE)
            if fresh:
                self.cache = compute_reference_cache(self, graphdef, state, mesh)
                if jax.process_index() == 0:
                    buf = io.BytesIO()
                    np.savez(buf, ref=self.cache)
                    write_atomic(path, buf.getvalue())  # a kill mid-write leaves the old file or none
            else:
                self.cache = read_reference_cache(path, self.data.stats.samples)
        fields = {
            "train_iter": iter(self.batches(self.data.train, self.cfg.data.shuffle_seed, True, self.cache))
        }
        if len(self.data.eval):
            fields["eval_batches"] = lambda: iter(
                self.batches(self.data.eval, 1, False, self.cache, split="eval")
            )
        return fields


def frozen_reference(state: dict) -> dict:
    """`dpo.reference: copy`: the train state keeps a frozen copy of the starting params."""
    return {"ref_params": jax.tree.map(jnp.copy, state["params"])}


def reference_inputs(forward, state: dict, micro: dict) -> dict:
    """With the frozen copy, its per-token log-probs join each micro-batch inside the step (a cached
    reference's sums already come with the batch)."""
    if "ref_params" not in state:
        return micro
    return {**micro, "ref_logp": reference_logps(forward(state["ref_params"], micro), micro)}


def base_reference_inputs(forward, state: dict, micro: dict) -> dict:
    """`dpo.reference: base` (LoRA): the reference is the policy with zeroed adapters, i.e. the frozen
    base itself; no copy of anything is kept."""
    off = jax.tree.map(jnp.zeros_like, state["params"])
    return {**micro, "ref_logp": reference_logps(forward(jax.lax.stop_gradient(off), micro), micro)}


def read_reference_cache(path: str, samples: int) -> np.ndarray:
    """The cached reference log-prob sums of a resumed run: [samples, 2], finite, or one clear error."""
    fix = (
        "a resumed cached-reference DPO run needs the reference log-probs computed at its start; restore the "
        "file from a backup or start again in a new --workdir"
    )
    if not as_path(path).is_file():
        raise CheckpointError(f"{path} is missing: {fix}")
    try:
        with np.load(io.BytesIO(as_path(path).read_bytes())) as f:
            cache = np.asarray(f["ref"])
    except Exception as e:  # noqa: BLE001 - zip, pickle and key errors all mean a damaged file
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e}): {fix}") from None
    if cache.shape != (samples, 2) or not np.all(np.isfinite(cache)):
        raise CheckpointError(
            f"{path} holds {cache.shape} values (finite: {bool(np.all(np.isfinite(cache)))}) but "
            f"the data has {samples} pairs: it belongs to other data or is damaged; {fix}"
        )
    return cache


def compute_reference_cache(dpo: DPOTask, graphdef, state, mesh) -> np.ndarray:
    """One pass over train + eval pairs with the starting params: cache[example, 0 | 1] = summed
    reference log-probs of the chosen | rejected response."""

    @jax.jit
    def logps(state, batch):
        out = model_of(graphdef, state).apply_batch(batch)
        return reference_logps(out, batch) * batch["loss_mask"]

    cache = np.zeros((dpo.data.stats.samples, 2), np.float32)
    for samples in (dpo.data.train, dpo.data.eval):
        if not len(samples):
            continue
        for batch in dpo.batches(samples, 0, False):
            with jax.set_mesh(mesh):
                lp = np.asarray(jax.device_get(logps(state, place_batch(batch, mesh, 0))))
            seg, ex = batch["segment_ids"], batch["example"]
            for b in range(seg.shape[0]):
                for s in np.unique(seg[b][seg[b] > 0]):
                    sel = seg[b] == s
                    cache[int(ex[b][sel][0]), (int(s) + 1) % 2] = lp[b][sel].sum()
    return cache


# held-out pairs: the preference loss and rewards per pair, the chosen responses' NLL per token
DPO_EVAL = EvalReport(
    means=(
        ("dpo_loss", "pairs"),
        ("reward_accuracy", "pairs"),
        ("reward_margin", "pairs"),
        ("reward_chosen", "pairs"),
        ("reward_rejected", "pairs"),
        ("lm_loss", "tokens"),
    ),
    loss="dpo_loss",
    per_token=False,
)


def dpo_task(cfg: Config) -> Task:
    dpo = DPOTask(cfg)
    # SimPO and reference_free need no reference model at all
    needs_ref = not (cfg.dpo.reference_free or cfg.dpo.loss_type == "simpo")
    copy = cfg.dpo.reference == "copy" and needs_ref
    inputs = (
        {"copy": reference_inputs, "base": base_reference_inputs}.get(cfg.dpo.reference)
        if needs_ref
        else None
    )
    return Task(
        objective=dpo_objective,
        train_iter=None,
        eval_batches=None,
        vocab_size=dpo.data.tokenizer.vocab_size,
        stats=dpo.data.stats,
        eval_report=DPO_EVAL,
        tokenizer=dpo.data.tokenizer,
        init_state=frozen_reference if copy else None,
        batch_inputs=inputs,
        prepare=dpo.prepare,
        description=f"preference data: {dpo.data.stats.summary()}, {len(dpo.data.train)} train / "
        f"{len(dpo.data.eval)} eval pairs, {cfg.dpo.loss_type} loss, beta {cfg.dpo.beta}, "
        f"reference {cfg.dpo.reference}",
    )
