"""Conversion between Hugging Face directories, ernie_jax param directories, training runs and
models: the entry points of `python -m ernie_jax.convert`, `load_pretrained` and the trainer's
checkpoint.init_from. Readers and writers live in `hf_io` (Hugging Face) and `param_dir` (ours);
every destination is written atomically (`destination`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Callable

import jax
import numpy as np
from flax import nnx

from ernie_jax.checkpoint.restore import restore_leaf
from ernie_jax.config import Config, check_same_model, to_dict
from ernie_jax.convert.destination import check_destination, log_progress
from ernie_jax.convert.hf_io import get_path, hf_config, read_hf_params, write_hf
from ernie_jax.convert.hf_text import HFCheckpoint
from ernie_jax.convert.param_dir import (
    CONFIG_FILE,
    abstract_state,
    model_from_params,
    read_our_config,
    restore_param,
    restore_params,
    save_params,
)
from ernie_jax.convert.peft import adapter_path, write_peft
from ernie_jax.convert.run_export import (
    RunCheckpoint,
    adapter_arrays,
    find_checkpoint,
    is_run,
    leaf_loader,
    model_files,
    param_paths,
    with_dtype,
)
from ernie_jax.data.tokenizer import Tokenizer
from ernie_jax.errors import CheckpointError
from ernie_jax.model import build_model
from ernie_jax.model.ernie import ErnieForCausalLM
from ernie_jax.model.lora import merged_kernel
from ernie_jax.ops.lora import lora_scale
from ernie_jax.paths import as_path, is_remote, join, shown


def load_pretrained(
    path: str, dtype: str = "float32", quiet: bool = True, step: int | None = None
) -> ErnieForCausalLM:
    """A ready NNX model from a Hugging Face directory, an ernie_jax converted checkpoint or a
    training workdir (its newest good checkpoint, or `step`; a stages workdir: its last stage)."""
    if is_run(path) and not as_path(join(path, CONFIG_FILE)).is_file():
        run = find_checkpoint(path, step)
        cfg = with_dtype(run.config, dtype)
        load = run_loader(run)
        shapes = nnx.to_pure_dict(abstract_state(cfg)[1])
        return model_from_params(cfg, jax.tree_util.tree_map_with_path(lambda p, _: load(p), shapes))
    if step is not None:
        raise CheckpointError(f"step={step} applies to training workdirs; {shown(path)} is not one")
    if as_path(join(path, CONFIG_FILE)).is_file():
        cfg = read_our_config(path, dtype)
        params = restore_params(path, cfg)
    else:
        ckpt = HFCheckpoint(path)
        cfg = hf_config(ckpt, dtype)
        params = read_hf_params(ckpt, cfg, quiet=quiet)
    return model_from_params(cfg, params)


def hf_to_ernie(src: str, dst: str, dtype: str = "float32", quiet: bool = False) -> Config:
    """HF directory -> orbax params checkpoint + ernie_config.json, streaming through disk-backed arrays."""
    ckpt = HFCheckpoint(src)
    cfg = hf_config(ckpt, dtype)
    check_destination(dst)
    log_progress(f"converting {src} -> {dst} ({len(ckpt.weight_map)} tensors)", quiet)
    near = None if is_remote(dst) else os.path.dirname(os.path.abspath(dst)) or "."
    scratch = tempfile.mkdtemp(prefix=".ernie-convert-", dir=near)
    try:
        params = read_hf_params(ckpt, cfg, scratch=scratch, quiet=quiet)
        save_params(dst, cfg, params, quiet=quiet)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return cfg


def ernie_to_hf(
    src: str,
    dst: str,
    shard_bytes: int = 2 << 30,
    quiet: bool = False,
    step: int | None = None,
    dtype: str = "float32",
    merge_lora: bool = False,
    lora_adapter: bool = False,
) -> Config:
    """A converted directory (hf-to-ernie) or a training run (a training workdir: its newest good
    checkpoint or `step`; a stages workdir: its last stage) -> HF directory, one param at a time.
    A run's export also carries its tokenizer (with the chat template) and generation_config.json.
    A LoRA run exports `merge_lora` (full weights W + scale * A B) or `lora_adapter` (a PEFT directory)."""
    if as_path(join(src, CONFIG_FILE)).is_file():
        if step is not None:
            raise CheckpointError(
                f"--step {step} applies to training workdirs; {shown(src)} is a converted one"
            )
        if merge_lora or lora_adapter:
            raise CheckpointError(f"{shown(src)} holds no adapters; drop --merge-lora / --lora-adapter")
        cfg = read_our_config(src)
        check_destination(dst)
        log_progress(f"exporting {src} -> {dst}", quiet)
        load, extras = (lambda path: restore_param(src, path)), {}
    elif is_run(src):
        run = find_checkpoint(src, step)
        cfg = run.config
        if run.lora.enabled != (merge_lora or lora_adapter) or (merge_lora and lora_adapter):
            raise CheckpointError(
                f"{shown(run.workdir)} is a LoRA run: pass --merge-lora (full weights) or --lora-adapter "
                f"(a PEFT directory)"
                if run.lora.enabled
                else f"{shown(run.workdir)} has no adapters (lora.enabled=false); drop --merge-lora / "
                f"--lora-adapter"
            )
        check_destination(dst)
        if lora_adapter:
            log_progress(
                f"writing the adapters of {shown(run.workdir)} step {run.step} -> {dst} (PEFT)", quiet
            )
            write_peft(dataclasses.replace(cfg, lora=run.lora), adapter_arrays(run), dst)
            return cfg
        extras = model_files(cfg, Tokenizer(cfg.data.tokenizer))
        load = run_loader(run)
        log_progress(f"exporting {shown(run.workdir)} step {run.step} -> {dst}", quiet)
    else:
        raise CheckpointError(
            f"{shown(src)} is neither a training workdir (checkpoints/), a stages workdir nor a "
            f"directory written by hf-to-ernie ({CONFIG_FILE}); pass one of those"
        )
    write_hf(cfg, load, dst, shard_bytes=shard_bytes, quiet=quiet, dtype=dtype, extras=extras)
    return cfg


def run_loader(run: RunCheckpoint) -> Callable[[tuple], np.ndarray]:
    """path -> np.ndarray of one array of the model a run's step holds; for a LoRA run, the base
    weight (saved with the run, or read from its checkpoint.init_from) plus scale * A B of its adapter."""
    if not run.lora.enabled:
        return leaf_loader(run)
    base = _base_loader(run)
    buffers = leaf_loader(run)  # the run's buffers (routing biases): stay as the base had them
    params = param_paths(run.config)
    adapters = {p[:-1] for p in param_paths(dataclasses.replace(run.config, lora=run.lora))}
    scale = lora_scale(run.lora.alpha, run.lora.rank, run.lora.rslora)

    def load(path: tuple) -> np.ndarray:
        key = tuple(str(getattr(p, "key", p)) for p in path)
        if key not in params:
            return buffers(key)
        w = np.asarray(base(key), np.float32)
        ab = adapter_path(key)
        if ab in adapters:
            a, b = (np.asarray(restore_leaf(run.state_dir, ("params", *ab, n)), np.float32) for n in "ab")
            w = merged_kernel(w, a, b, scale)
        return w

    return load


def _base_loader(run: RunCheckpoint) -> Callable[[tuple], np.ndarray]:
    """The frozen base of a LoRA run: its checkpoint's (lora.save_base) or checkpoint.init_from's."""
    if run.lora.save_base:
        return leaf_loader(run, params_part="base")
    src = run.config.checkpoint.init_from
    if not src:  # a LoRA run from scratch: its base is the seed's initialisation, rebuilt here
        model = build_model(run.config, nnx.Rngs(run.config.train.seed))
        dtype = run.lora.base_dtype or run.config.model.param_dtype
        params = jax.tree.map(
            lambda x: np.asarray(x.astype(dtype)), nnx.to_pure_dict(nnx.state(model, nnx.Param))
        )
        return lambda key: get_path(params, key)
    if as_path(join(src, CONFIG_FILE)).is_file():
        return lambda key: restore_param(src, key)
    if is_run(src):
        return leaf_loader(find_checkpoint(src))
    params = read_hf_params(HFCheckpoint(src), run.config)
    return lambda key: get_path(params, key)


def params_from_pretrained(path: str, cfg: Config, params: dict, buffers: dict | None = None):
    """`params` (and `buffers`: the routing bias) filled from a converted orbax dir (hf-to-ernie) or a
    HF directory, placed on their shardings (the trainer's checkpoint.init_from)."""
    if as_path(join(path, CONFIG_FILE)).is_file():
        check_same_model(to_dict(read_our_config(path)), cfg, path, "fix checkpoint.init_from")
        loaded = restore_params(path, cfg)
    elif is_remote(path) or os.path.isfile(os.path.join(path, "config.json")):  # HFCheckpoint: local only
        ckpt = HFCheckpoint(path)
        check_same_model(to_dict(hf_config(ckpt, cfg.model.dtype)), cfg, path, "fix checkpoint.init_from")
        loaded = read_hf_params(ckpt, cfg)
    else:
        raise CheckpointError(
            f"checkpoint.init_from={path} is neither a training workdir, an ernie_jax (hf-to-ernie) "
            f"nor a Hugging Face directory"
        )
    _, loaded_params, loaded_buffers = nnx.split(model_from_params(cfg, loaded), nnx.Param, ...)
    place = lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding)
    out = jax.tree.map(place, nnx.to_pure_dict(loaded_params), params)
    if buffers is None:
        return out
    return out, jax.tree.map(place, nnx.to_pure_dict(loaded_buffers), buffers)
