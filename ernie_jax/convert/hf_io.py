"""Hugging Face directories on the ernie_jax side: reading one into our param tree tensor by tensor
(memory-mapped safetensors; with a scratch directory the destination arrays are disk-backed too, so
peak host memory is about one tensor group), and writing our params as one, shard by shard."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import Config
from ernie_jax.convert.destination import atomic_dir, log_progress
from ernie_jax.convert.hf_text import HFCheckpoint, config_from_hf, config_to_hf, key_table, to_hf, to_ours
from ernie_jax.convert.param_dir import abstract_state
from ernie_jax.convert.safetensors_io import save_file
from ernie_jax.errors import CheckpointError
from ernie_jax.model.ernie import ErnieForCausalLM


def get_path(tree: dict, path: tuple[str, ...]):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            raise CheckpointError(f"internal key table names {'.'.join(path)}, which the model does not have")
        tree = tree[p]
    return tree


def read_hf_params(ckpt: HFCheckpoint, cfg: Config, scratch: str | None = None, quiet: bool = True) -> dict:
    """Pure param dict (numpy) for `cfg` from a HF checkpoint. Every model param must be covered."""
    _, state = abstract_state(cfg)
    shapes = nnx.to_pure_dict(state)

    def alloc(path, leaf):
        if scratch is None:
            return np.zeros(leaf.shape, leaf.dtype)
        name = os.path.join(scratch, "_".join(str(getattr(p, "key", p)) for p in path) + ".npy")
        return np.lib.format.open_memmap(name, mode="w+", dtype=leaf.dtype, shape=leaf.shape)

    params = jax.tree_util.tree_map_with_path(alloc, shapes)
    filled = {id(leaf): 0 for leaf in jax.tree.leaves(params)}
    table = key_table(cfg)
    by_key: dict[str, list] = {}
    for e in table:
        by_key.setdefault(e.key, []).append(e)
    for n, key in enumerate(ckpt.keys_by_file(by_key)):
        entries = by_key[key]
        if key.endswith("e_score_correction_bias") and key not in ckpt.weight_map:
            continue  # checkpoints without a correction bias route with bias 0
        raw = ckpt.get(key)
        for e in entries:
            target = get_path(params, e.path)
            want = target[e.index].shape if e.index else target.shape
            if e.part >= 0:
                if raw.ndim != 2 or raw.shape[0] != len(entries):
                    raise CheckpointError(
                        f"{ckpt.path}: tensor {key} has shape {raw.shape}, expected "
                        f"{(len(entries),) + tuple(want)} (one row per modality)"
                    )
                t = raw[e.part]
            else:
                t = to_ours(raw, e.layout)
            if t.shape != want:
                shown = raw.shape if e.part < 0 else raw.shape[1:]
                raise CheckpointError(
                    f"{ckpt.path}: tensor {key} has shape {tuple(shown)}, expected "
                    f"{to_hf(np.empty(want), e.layout).shape} for this config.json"
                )
            if e.index:
                target[e.index] = t
            else:
                target[...] = t
            filled[id(target)] += 1
        if (n + 1) % 200 == 0:
            log_progress(f"  read {n + 1}/{len(table)} tensors", quiet)
    unfilled = [
        jax.tree_util.keystr(p)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
        if filled[id(v)] == 0 and not p[-1].key == "correction_bias"
    ]
    if unfilled:
        raise CheckpointError(
            f"{ckpt.path}: no tensor filled {unfilled[0]}; the checkpoint does not match its config"
        )
    return params


def hf_config(ckpt: HFCheckpoint, dtype: str) -> Config:
    cfg = config_from_hf(ckpt.config, dtype=dtype, source=os.path.join(ckpt.path, "config.json"))
    if cfg.model.mtp_depth and "model.mtp_emb_norm.0.weight" not in ckpt.weight_map:
        # transformers drops MTP weights on save; keep the rest of the model usable.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mtp_depth=0))
    return cfg


def save_pretrained(
    model: ErnieForCausalLM, path: str, shard_bytes: int = 2 << 30, quiet: bool = True
) -> None:
    """Write `model` as a Hugging Face directory (config.json + sharded safetensors + index)."""
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    write_hf(model.architecture(), params, path, shard_bytes=shard_bytes, quiet=quiet)


def write_hf(
    cfg: Config,
    params: dict | Callable[[tuple], np.ndarray],
    path: str,
    shard_bytes: int = 2 << 30,
    quiet: bool = True,
    dtype: str = "float32",
    extras: dict[str, bytes] | None = None,
) -> None:
    """Write the HF layout shard by shard. `params` is a pure dict or a loader path -> array; with a
    loader, tensors are written grouped by param so only one param (e.g. one stacked expert
    projection) is in memory at a time. Float tensors are stored in `dtype` (the routing correction
    biases stay fp32: top-k selection is sensitive to them); `extras` are further files (name ->
    bytes: tokenizer, generation_config.json) written into the same atomic directory."""
    store = np.dtype(jnp.dtype(dtype))
    if callable(params):
        shapes, leaf = nnx.to_pure_dict(abstract_state(cfg)[1]), _OneLeaf(params)
    else:
        shapes, leaf = params, (lambda p: get_path(params, p))
    full = key_table(cfg)
    table = sorted(
        (e for e in full if e.part < 0), key=lambda e: e.path
    )  # stable: layer order within a param
    parted = [e for e in full if e.part >= 0]  # small rows of a shared tensor (VL biases): written last
    with atomic_dir(path, keyed_on=("config.json",)) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**config_to_hf(cfg), "dtype": dtype}, f, indent=2)
        for name, data in (extras or {}).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        groups, current, size = [], [], 0
        for e in table:
            target = get_path(shapes, e.path)
            nbytes = int(np.prod(target.shape[len(e.index) :])) * np.dtype(target.dtype).itemsize
            if current and size + nbytes > shard_bytes:
                groups.append(current)
                current, size = [], 0
            current.append(e)
            size += nbytes
        groups.append(current + parted)
        weight_map, total = {}, 0
        for i, group in enumerate(groups):
            name = (
                f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                if len(groups) > 1
                else "model.safetensors"
            )
            tensors, parts = {}, {}
            for e in group:
                target = leaf(e.path)
                value = np.asarray(target[e.index] if e.index else target)
                if e.part >= 0:
                    parts.setdefault(e.key, {})[e.part] = value
                    continue
                tensors[e.key] = to_hf(value, e.layout)
            for key, rows in parts.items():
                tensors[key] = np.stack([rows[r] for r in sorted(rows)])
            tensors = {
                k: t.astype(store)
                if jnp.issubdtype(t.dtype, jnp.floating) and "correction_bias" not in k
                else t
                for k, t in tensors.items()
            }
            for key, t in tensors.items():
                weight_map[key] = name
                total += t.nbytes
            save_file(tensors, os.path.join(tmp, name))
            log_progress(f"  wrote {name} ({len(tensors)} tensors)", quiet)
        if len(groups) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


class _OneLeaf:
    """Caches the most recently loaded param only."""

    def __init__(self, load: Callable[[tuple], np.ndarray]):
        self.load, self.path, self.value = load, None, None

    def __call__(self, path: tuple) -> np.ndarray:
        if path != self.path:
            self.value = None
            self.path, self.value = path, self.load(path)
        return self.value
