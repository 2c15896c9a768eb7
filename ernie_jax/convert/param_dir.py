"""ernie_jax's own param directory (what hf-to-ernie writes and checkpoint.init_from reads):
`ernie_config.json` plus one small orbax checkpoint per param under `params/<dotted.path>`, and the
model's param tree as shapes (`abstract_state`) or filled (`model_from_params`)."""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import Config, from_dict, to_json
from ernie_jax.convert.destination import atomic_dir, log_progress
from ernie_jax.errors import CheckpointError
from ernie_jax.model import build_model
from ernie_jax.model.ernie import ErnieForCausalLM
from ernie_jax.paths import as_path, join, shown

CONFIG_FILE = "ernie_config.json"
PARAMS_DIR = "params"


def abstract_state(cfg: Config):
    """(graphdef, pure dict of ShapeDtypeStruct) of the model, without allocating it."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))))
    return graphdef, state


def model_from_params(cfg: Config, params: dict) -> ErnieForCausalLM:
    graphdef, state = abstract_state(cfg)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def read_our_config(path: str, dtype: str | None = None) -> Config:
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


def leaf_dir(path: str, param_path) -> str:
    return join(shown(path), PARAMS_DIR, ".".join(str(getattr(p, "key", p)) for p in param_path))


def save_params(path: str, cfg: Config, params: dict, quiet: bool = True) -> None:
    """Params + our config JSON (what the trainer's init_from reads). Each param is its own small
    orbax checkpoint under params/<dotted.path>, written one after another, so saving never holds
    more than one param's serialization buffers (a whole-tree orbax save copies every array)."""
    import orbax.checkpoint as ocp

    with atomic_dir(path, keyed_on=(CONFIG_FILE,)) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            for param_path, leaf in jax.tree_util.tree_leaves_with_path(params):
                ckptr.save(leaf_dir(tmp, param_path), {"value": leaf})
                ckptr.wait_until_finished()
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(to_json(cfg))
    log_progress(f"  saved orbax params to {path}", quiet)


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
                return ckptr.restore(leaf_dir(path, param_path), {"value": want})["value"]
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(
                f"{path}: param {jax.tree_util.keystr(param_path)} is missing or does not match "
                f"{CONFIG_FILE} ({str(e).splitlines()[0]})"
            ) from None

    return jax.tree_util.tree_map_with_path(restore, target)


def restore_param(path: str, param_path: tuple[str, ...]) -> np.ndarray:
    """One param of a `save_params` checkpoint as numpy, without reading the others."""
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(
                leaf_dir(path, param_path),
                args=ocp.args.PyTreeRestore(restore_args={"value": ocp.RestoreArgs(restore_type=np.ndarray)}),
            )
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(
            f"{path}: cannot read param {'.'.join(param_path)} ({str(e).splitlines()[0]})"
        ) from None
    return out["value"]
