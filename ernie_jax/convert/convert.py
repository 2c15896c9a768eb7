"""Streaming conversion between Hugging Face directories, ernie_jax models and orbax checkpoints.

Import fills each stacked param tensor by tensor from memory-mapped safetensors; when a scratch
directory is given the destination arrays are disk-backed too (np.memmap), so peak host memory is
about one tensor group rather than the whole model. Export writes shard by shard.
Destinations are written to a temporary sibling and renamed at the end: a failed conversion
leaves nothing at DST.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.checkpoint.restore import restore_leaf
from ernie_jax.config import Config, check_same_model, from_dict, to_dict, to_json
from ernie_jax.convert.hf_text import HFCheckpoint, config_from_hf, config_to_hf, key_table, to_hf, to_ours
from ernie_jax.convert.peft import adapter_path, write_peft
from ernie_jax.convert.run_export import (
    RunCheckpoint,
    param_paths,
    adapter_arrays,
    find_checkpoint,
    is_run,
    leaf_loader,
    model_files,
    with_dtype,
)
from ernie_jax.convert.safetensors_io import save_file
from ernie_jax.data.tokenizer import Tokenizer
from ernie_jax.errors import CheckpointError
from ernie_jax.model import build_model
from ernie_jax.model.ernie import ErnieForCausalLM
from ernie_jax.model.lora import merged_kernel
from ernie_jax.ops.lora import lora_scale
from ernie_jax.paths import as_path, files_under, is_remote, join, shown

CONFIG_FILE = "ernie_config.json"
PARAMS_DIR = "params"


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            raise CheckpointError(f"internal key table names {'.'.join(path)}, which the model does not have")
        tree = tree[p]
    return tree


def abstract_state(cfg: Config):
    """(graphdef, pure dict of ShapeDtypeStruct) of the model, without allocating it."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))
    return graphdef, state


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
            target = _get(params, e.path)
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
            _log(f"  read {n + 1}/{len(table)} tensors", quiet)
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


def _hf_config(ckpt: HFCheckpoint, dtype: str) -> Config:
    cfg = config_from_hf(ckpt.config, dtype=dtype, source=os.path.join(ckpt.path, "config.json"))
    if cfg.model.mtp_depth and "model.mtp_emb_norm.0.weight" not in ckpt.weight_map:
        # transformers drops MTP weights on save; keep the rest of the model usable.
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mtp_depth=0))
    return cfg


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
        cfg = _read_our_config(path, dtype)
        params = restore_params(path, cfg)
    else:
        ckpt = HFCheckpoint(path)
        cfg = _hf_config(ckpt, dtype)
        params = read_hf_params(ckpt, cfg, quiet=quiet)
    return model_from_params(cfg, params)


def model_from_params(cfg: Config, params: dict) -> ErnieForCausalLM:
    graphdef, state = abstract_state(cfg)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


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
        shapes, leaf = params, (lambda p: _get(params, p))
    full = key_table(cfg)
    table = sorted(
        (e for e in full if e.part < 0), key=lambda e: e.path
    )  # stable: layer order within a param
    parted = [e for e in full if e.part >= 0]  # small rows of a shared tensor (VL biases): written last
    with _atomic_dir(path) as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**config_to_hf(cfg), "dtype": dtype}, f, indent=2)
        for name, data in (extras or {}).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        groups, current, size = [], [], 0
        for e in table:
            target = _get(shapes, e.path)
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
            _log(f"  wrote {name} ({len(tensors)} tensors)", quiet)
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


class _atomic_dir:
    """Write into a temporary local directory; on success it becomes `path`: renamed into place when
    `path` is local, uploaded file by file when it is an object-store URL, with the config files last
    (a reader keys on them, so a half-uploaded directory is never taken for a finished one)."""

    def __init__(self, path: str):
        self.path = shown(path)

    def __enter__(self) -> str:
        check_destination(self.path)
        near = None if is_remote(self.path) else os.path.dirname(self.path)
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.path) + ".partial-", dir=near)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # disk full, quota, a read-only mount appearing mid-write
                raise CheckpointError(
                    f"cannot write {self.path} ({exc.strerror or exc}); nothing was written "
                    f"there: free space or choose another destination"
                ) from None
            return False
        if is_remote(self.path):
            try:
                last = ("config.json", CONFIG_FILE)
                for rel in sorted(files_under(self.tmp), key=lambda r: r in last):
                    as_path(join(self.path, rel)).parent.mkdir(parents=True, exist_ok=True)
                    with open(os.path.join(self.tmp, rel), "rb") as src:
                        with as_path(join(self.path, rel)).open("wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 24)  # streamed: a shard is never held whole
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.isdir(self.path):
            os.rmdir(self.path)
        os.rename(self.tmp, self.path)
        return False


def check_destination(path: str) -> None:
    """A conversion destination must be new (or an empty directory) inside a writable directory:
    checked before any tensor is read, so a long conversion cannot fail at its end."""
    if is_remote(path):
        dest = as_path(path)
        if dest.exists() and (not dest.is_dir() or any(True for _ in dest.iterdir())):
            raise CheckpointError(
                f"destination {path} already exists and is not empty; choose a new directory"
            )
        try:
            probe = as_path(join(path, ".write-probe"))
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(
                f"destination {path}: cannot write there ({e}); check the bucket and its permissions"
            ) from None
        return
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CheckpointError(f"destination {path} already exists and is not empty; choose a new directory")
    parent = os.path.dirname(path)
    if os.path.isfile(parent):
        raise CheckpointError(
            f"destination {path}: {parent} is a file, not a directory; choose another destination"
        )
    try:
        os.makedirs(parent, exist_ok=True)
        tempfile.TemporaryFile(dir=parent).close()  # os.access is not enough: root on a read-only mount
    except OSError as e:
        raise CheckpointError(
            f"destination {path}: cannot write in {parent} ({e.strerror or e}); choose a writable directory"
        ) from None


# ----------------------------------------------------------------------------- orbax side


def _read_our_config(path: str, dtype: str | None = None) -> Config:
    file = join(path, CONFIG_FILE)
    try:
        raw = json.loads(as_path(file).read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if dtype:
            raw.setdefault("model", {})["dtype"] = dtype
        return from_dict(raw)
    except (OSError, ValueError) as e:  # ConfigError is a ValueError: it names the bad key
        raise CheckpointError(
            f"{file} is unreadable or invalid ({e}); it was written by hf-to-ernie or the "
            f"trainer: convert again"
        ) from None


def _leaf_dir(path: str, param_path) -> str:
    return join(shown(path), PARAMS_DIR, ".".join(str(getattr(p, "key", p)) for p in param_path))


def save_params(path: str, cfg: Config, params: dict, quiet: bool = True) -> None:
    """Params + our config JSON (what the trainer's init_from reads). Each param is its own small
    orbax checkpoint under params/<dotted.path>, written one after another, so saving never holds
    more than one param's serialization buffers (a whole-tree orbax save copies every array)."""
    import orbax.checkpoint as ocp

    with _atomic_dir(path) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            for param_path, leaf in jax.tree_util.tree_leaves_with_path(params):
                ckptr.save(_leaf_dir(tmp, param_path), {"value": leaf})
                ckptr.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(to_json(cfg))
    _log(f"  saved orbax params to {path}", quiet)


def restore_params(path: str, cfg: Config, shardings: Callable | None = None) -> dict:
    """Restore the pure param dict saved by `save_params` (onto `shardings(path, leaf)` if given)."""
    import orbax.checkpoint as ocp

    _, state = abstract_state(cfg)
    target = nnx.to_pure_dict(state)
    if not as_path(join(path, PARAMS_DIR)).is_dir():
        raise CheckpointError(
            f"{path} has no {PARAMS_DIR}/ directory: convert it with "
            f"`python -m ernie_jax.convert hf-to-ernie`"
        )

    def restore(param_path, leaf):
        sharding = shardings(param_path, leaf) if shardings is not None else None
        want = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        try:
            with ocp.StandardCheckpointer() as ckptr:
                return ckptr.restore(_leaf_dir(path, param_path), {"value": want})["value"]
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"{path}: param {jax.tree_util.keystr(param_path)} is missing or does not match "
                f"{CONFIG_FILE} ({str(e).splitlines()[0]})"
            ) from None

    return jax.tree_util.tree_map_with_path(restore, target)


def hf_to_ernie(src: str, dst: str, dtype: str = "float32", quiet: bool = False) -> Config:
    """HF directory -> orbax params checkpoint + ernie_config.json, streaming through disk-backed arrays."""
    ckpt = HFCheckpoint(src)
    cfg = _hf_config(ckpt, dtype)
    check_destination(dst)
    _log(f"converting {src} -> {dst} ({len(ckpt.weight_map)} tensors)", quiet)
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
        cfg = _read_our_config(src)
        check_destination(dst)
        _log(f"exporting {src} -> {dst}", quiet)
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
            _log(f"writing the adapters of {shown(run.workdir)} step {run.step} -> {dst} (PEFT)", quiet)
            write_peft(dataclasses.replace(cfg, lora=run.lora), adapter_arrays(run), dst)
            return cfg
        extras = model_files(cfg, Tokenizer(cfg.data.tokenizer))
        load = run_loader(run)
        _log(f"exporting {shown(run.workdir)} step {run.step} -> {dst}", quiet)
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
        return lambda key: _get(params, key)
    if as_path(join(src, CONFIG_FILE)).is_file():
        return lambda key: restore_param(src, key)
    if is_run(src):
        return leaf_loader(find_checkpoint(src))
    params = read_hf_params(HFCheckpoint(src), run.config)
    return lambda key: _get(params, key)


def restore_param(path: str, param_path: tuple[str, ...]) -> np.ndarray:
    """One param of a `save_params` checkpoint as numpy, without reading the others."""
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(
                _leaf_dir(path, param_path),
                args=ocp.args.PyTreeRestore(restore_args={"value": ocp.RestoreArgs(restore_type=np.ndarray)}),
            )
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(
            f"{path}: cannot read param {'.'.join(param_path)} ({str(e).splitlines()[0]})"
        ) from None
    return out["value"]


def params_from_pretrained(path: str, cfg: Config, params: dict, buffers: dict | None = None):
    """`params` (and `buffers`: the routing bias) filled from a converted orbax dir (hf-to-ernie) or a
    HF directory, placed on their shardings (the trainer's checkpoint.init_from)."""
    if as_path(join(path, CONFIG_FILE)).is_file():
        check_same_model(to_dict(_read_our_config(path)), cfg, path, "fix checkpoint.init_from")
        loaded = restore_params(path, cfg)
    elif is_remote(path) or os.path.isfile(os.path.join(path, "config.json")):  # HFCheckpoint: local only
        ckpt = HFCheckpoint(path)
        check_same_model(to_dict(_hf_config(ckpt, cfg.model.dtype)), cfg, path, "fix checkpoint.init_from")
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
