"""A training run as a model: find the checkpoint of a training workdir (pretraining, SFT, DPO) or
of the last stage of a stages workdir, read its params and routing biases one array at a time, and
the files that travel with an exported model (the run's tokenizer with the ERNIE chat template,
ERNIE's generation defaults)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import numpy as np
from flax import nnx

from ernie_jax.checkpoint.manager import Checkpointer
from ernie_jax.checkpoint.restore import restore_leaf
from ernie_jax.config import Config, LoraConfig, MeshConfig, PipelineConfig, PrecisionConfig, from_dict
from ernie_jax.data.chat import BEGIN, END
from ernie_jax.data.tokenizer import EMBEDDED_DIR, Tokenizer
from ernie_jax.errors import CheckpointError, ConfigError, DataError
from ernie_jax.model import build_model
from ernie_jax.model.lora import base_config
from ernie_jax.paths import as_path, join, shown

CHECKPOINTS = "checkpoints"
STAGE_DIR = re.compile(r"^(\d+)_")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "special_tokens_map.json", "added_tokens.json")

# ERNIE 4.5's recommended sampling (model cards of baidu/ERNIE-4.5-*: temperature 0.8, top-p 0.8)
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.8}


@dataclass(frozen=True)
class RunCheckpoint:
    """One saved step of a training run: `workdir` holds `checkpoints/<step>/`."""

    workdir: str
    step: int
    config: Config  # the model's config (without adapters: the weights export writes)
    lora: LoraConfig = LoraConfig()  # the run's adapters (enabled: params hold adapters only)

    @property
    def state_dir(self) -> str:
        return join(self.workdir, CHECKPOINTS, str(self.step), "state")


def is_run(path: str) -> bool:
    """A training workdir (has checkpoints/) or a stages workdir (has numbered stage directories)."""
    p = as_path(path)
    return p.is_dir() and ((p / CHECKPOINTS).is_dir() or bool(_stage_dirs(path)))


def _stage_dirs(path: str) -> list[str]:
    p = as_path(path)
    found = [(int(m.group(1)), c.name) for c in p.iterdir() if c.is_dir() and (m := STAGE_DIR.match(c.name))]
    return [
        join(path, name) for _, name in sorted(found) if (as_path(join(path, name)) / CHECKPOINTS).is_dir()
    ]


def find_checkpoint(path: str, step: int | None = None) -> RunCheckpoint:
    """The newest step of `path` whose files match their checksums (a damaged one is skipped, never
    moved: exporting leaves the run as it is), or exactly `step`. A stages workdir means its last
    stage that has checkpoints."""
    workdir = path
    if not (as_path(path) / CHECKPOINTS).is_dir():
        stages = _stage_dirs(path)
        if not stages:
            raise CheckpointError(
                f"{shown(path)} is not a training workdir (no {CHECKPOINTS}/ and no stage directories); "
                f"pass the --workdir of a training run"
            )
        workdir = stages[-1]
    ckpt = Checkpointer(join(workdir, CHECKPOINTS), 1, False)
    steps = ckpt.steps()
    if not steps:
        raise CheckpointError(f"{shown(workdir)} has no checkpoints yet; train it for at least one save")
    if step is not None:
        if step not in steps:
            raise CheckpointError(
                f"--step {step}: {shown(workdir)} has steps {', '.join(map(str, steps))}; pick one of them"
            )
        return _run_checkpoint(workdir, step, ckpt.verified_config(step))
    problems = []
    for s in reversed(steps):
        try:
            return _run_checkpoint(workdir, s, ckpt.verified_config(s))
        except CheckpointError as e:
            problems.append(str(e))
    raise CheckpointError(f"{shown(workdir)}: no readable checkpoint ({problems[0]}); pass an older --step")


def _run_checkpoint(workdir: str, step: int, saved: dict) -> RunCheckpoint:
    cfg = model_config(saved, workdir)
    return RunCheckpoint(workdir, step, base_config(cfg), cfg.lora)


def checkpoint_tokenizer(checkpoint: str, override: str | None = None, step: int | None = None) -> Tokenizer:
    """The tokenizer that goes with a checkpoint: `override`, a training run's `data.tokenizer`, or
    the tokenizer files in the (HF or converted) directory itself."""
    if override:
        return Tokenizer(override)
    if is_run(checkpoint) and not as_path(join(checkpoint, "ernie_config.json")).is_file():
        return Tokenizer(find_checkpoint(checkpoint, step).config.data.tokenizer)
    try:
        return Tokenizer(checkpoint)
    except DataError:
        raise DataError(
            f"--checkpoint {checkpoint} has no tokenizer.model or tokenizer.json; pass --tokenizer DIR"
        ) from None


def model_config(saved: dict, where: str) -> Config:
    """The saved run config with the training-only settings removed: one device, no pipeline, no
    FP8, dropless MoE dispatch (capacity drops are a training-time budget; transformers and
    generation route every token). The weights are the same."""
    try:
        cfg = from_dict(saved)
    except ConfigError as e:
        raise CheckpointError(f"{shown(where)}: its saved config does not load ({e})") from None
    return dataclasses.replace(
        cfg,
        mesh=MeshConfig(),
        pipeline=PipelineConfig(),
        precision=PrecisionConfig(),
        moe=dataclasses.replace(cfg.moe, dispatch="dropless"),
    )


def with_dtype(cfg: Config, dtype: str) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype, param_dtype="float32"))


def leaf_loader(run: RunCheckpoint, params_part: str = "params"):
    """path -> np.ndarray of one model array of the run's step (params or buffers); `params_part`:
    where the weights are ("base" in a LoRA run that saved its base)."""
    params = param_paths(run.config)

    def load(path: tuple) -> np.ndarray:
        key = tuple(str(getattr(p, "key", p)) for p in path)
        try:
            return restore_leaf(run.state_dir, (params_part if key in params else "buffers", *key))
        except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
            raise CheckpointError(
                f"{shown(run.workdir)} step {run.step}: cannot read {'.'.join(key)} "
                f"({str(e).splitlines()[0]}); the checkpoint is damaged: pass an older --step"
            ) from None

    return load


def adapter_arrays(run: RunCheckpoint) -> dict:
    """The run's adapters as a nested dict of numpy arrays ({... "q_proj": {"lora": {"a", "b"}}})."""
    out: dict = {}
    for path in sorted(param_paths(dataclasses.replace(run.config, lora=run.lora))):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = restore_leaf(run.state_dir, ("params", *path))
    return out


def param_paths(cfg: Config) -> set[tuple[str, ...]]:
    _, params, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))), nnx.Param, ...)
    return {tuple(str(k) for k in path) for path, _ in nnx.to_flat_state(params)}


def chat_template(begin: str, end: str) -> str:
    """A Jinja chat template that renders what `data/chat.py` trains on: `begin`, an optional system
    line, `User: ...\\n`, `Assistant: answer` + `end`; the generation prompt ends with `Assistant: `,
    followed by an empty think block when `enable_thinking` is false (no_thinking mode)."""
    return (
        "{{- '" + begin + "' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n' -}}"
        "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\\n' -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- 'Assistant: ' + message['content'] + '" + end + "' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}"
        "{%- if enable_thinking is defined and not enable_thinking -%}"
        "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
    )


def model_files(cfg: Config, tokenizer) -> dict[str, bytes]:
    """The tokenizer files of `data.tokenizer`, a tokenizer_config.json (special tokens, the chat
    template, the context length) and generation_config.json (ERNIE's sampling defaults)."""
    source = EMBEDDED_DIR if cfg.data.tokenizer == "embedded" else cfg.data.tokenizer
    files = {}
    for name in TOKENIZER_FILES:
        if as_path(join(source, name)).is_file():
            files[name] = as_path(join(source, name)).read_bytes()
    begin = BEGIN if tokenizer.piece_id(BEGIN) is not None else _piece(tokenizer, tokenizer.bos_id)
    end = END if tokenizer.piece_id(END) is not None else _piece(tokenizer, tokenizer.eos_id)
    m = cfg.model
    tok_cfg = {
        "bos_token": _piece(tokenizer, tokenizer.bos_id),
        "eos_token": _piece(tokenizer, tokenizer.eos_id),
        "pad_token": _piece(tokenizer, tokenizer.pad_id),
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": m.max_position_embeddings,
        "chat_template": chat_template(begin, end),
    }
    end_ids = sorted(
        {m.eos_token_id, *([tokenizer.piece_id(END)] if tokenizer.piece_id(END) is not None else [])}
    )
    gen = {
        **GENERATION_DEFAULTS,
        "bos_token_id": m.bos_token_id,
        "eos_token_id": end_ids if len(end_ids) > 1 else end_ids[0],
        "pad_token_id": m.pad_token_id,
    }
    files["tokenizer_config.json"] = json.dumps(tok_cfg, indent=2).encode()
    files["generation_config.json"] = json.dumps(gen, indent=2).encode()
    return files


def _piece(tokenizer, i: int) -> str:
    return tokenizer.piece(i)
