"""Starting one run from another's checkpoint: a subset of a train state (params and buffers of a
training workdir's newest step, leaves the target lacks left out and counted) and the optimizer
moments a stage keeps from the one before it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from ernie_jax.checkpoint.manager import Checkpointer
from ernie_jax.config import DROPPABLE, Config, check_same_model
from ernie_jax.errors import CheckpointError
from ernie_jax.paths import join


def restore_subset(step_dir: str, target: dict) -> tuple[dict, int]:
    """Partially restore `target` ({"params": ..., "buffers": ..., ...} of ShapeDtypeStructs with
    shardings) from a train-state checkpoint, keeping only the leaves the checkpoint has; returns the
    restored leaves as a dict of the same nesting (missing leaves absent) and the number of the
    checkpoint's leaves under those keys that the target has no place for (left out)."""
    with ocp.PyTreeCheckpointer() as c:
        meta = c.metadata(step_dir)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    have = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(meta)}
    flat = {jax.tree_util.keystr(p): (p, v) for p, v in jax.tree_util.tree_leaves_with_path(target)}
    keep = {k: pv for k, pv in flat.items() if k in have}
    parts = tuple(f"[{k!r}]" for k in target)
    left_out = sum(1 for k in have if k.startswith(parts) and k not in flat)
    if not keep:
        return {}, left_out
    subset: dict = {}
    for path, v in keep.values():
        node = subset
        for key in path[:-1]:
            node = node.setdefault(key.key, {})
        node[path[-1].key] = v
    args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), subset
    )
    with ocp.PyTreeCheckpointer() as c:
        got = c.restore(
            step_dir, args=ocp.args.PyTreeRestore(item=subset, restore_args=args, partial_restore=True)
        )
    return got, left_out


def restore_leaf(step_dir: str, key_path: tuple[str, ...]) -> np.ndarray:
    """One array of a train-state checkpoint (e.g. ("params", "units", "moe", ...)) as numpy on the
    host, reading nothing else: how an export streams a model larger than memory."""
    item: dict = {}
    node = item
    for key in key_path[:-1]:
        node = node.setdefault(key, {})
    node[key_path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
    with ocp.PyTreeCheckpointer() as c:
        got = c.restore(
            step_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=item, partial_restore=True)
        )
    for key in key_path:
        got = got[key]
    return got


def _merge(base: dict, update: dict) -> dict:
    return {
        k: (_merge(v, update[k]) if isinstance(v, dict) and k in update else update.get(k, v))
        for k, v in base.items()
    }


def state_from_workdir(
    path: str, cfg: Config, state: dict, keys=("params", "buffers"), adapters: bool = False
) -> tuple[dict, int, int]:
    """Params and buffers (and optionally opt_state) of the newest checkpoint of a training workdir.
    Leaves the checkpoint lacks (e.g. the vision parts when a text stage feeds a VL stage) keep their
    fresh initialisation; returns (updated parts, leaves restored, source leaves left out).
    `adapters`: the source is a LoRA run whose adapters are wanted (lora.init_from); otherwise a LoRA
    run, whose params are adapters only, is refused."""
    ckpt = Checkpointer(join(path, "checkpoints"), 1, False)
    newest = ckpt.newest_config(set_aside=False) if ckpt.steps() else None
    if newest is None:
        raise CheckpointError(
            f"checkpoint.init_from={path} is a training workdir without "
            f"{'readable ' if ckpt.steps() else ''}checkpoints"
        )
    check_same_model(newest[1], cfg, path, "fix checkpoint.init_from", droppable=DROPPABLE)
    source_lora = bool(newest[1].get("lora", {}).get("enabled"))
    if source_lora != adapters:
        raise CheckpointError(
            f"lora.init_from={path} is not a LoRA run; point it at a LoRA workdir or a PEFT directory"
            if adapters
            else f"checkpoint.init_from={path} is a LoRA run (adapters only); export it merged "
            f"(ernie-to-hf {path} DST --merge-lora) and start from DST, or set lora.init_from"
        )
    steps = [newest[0]]
    target = {
        k: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state[k])
        for k in keys
    }
    step_dir = join(path, "checkpoints", str(steps[-1]), "state")
    try:
        got, left_out = restore_subset(step_dir, target)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint.init_from={path}: step {steps[-1]} does not fit this model "
            f"({str(e).splitlines()[0]})"
        ) from None
    n = len(jax.tree.leaves(got))
    return {k: _merge(state[k], got.get(k, {})) for k in keys}, n, left_out


def kept_optimizer_state(workdir: str, opt_state):
    """The previous stage's optimizer state (moments, Adam's count) with the LR-schedule counters
    reset, so the new stage's schedule starts from its own warmup. The structure must match: same
    model and trainable set."""
    steps = Checkpointer(join(workdir, "checkpoints"), 1, False).steps()
    target = {
        "opt_state": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), opt_state
        )
    }
    args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target
    )
    try:
        with ocp.PyTreeCheckpointer() as c:
            got = c.restore(
                join(workdir, "checkpoints", str(steps[-1]), "state"),
                args=ocp.args.PyTreeRestore(item=target, restore_args=args, partial_restore=True),
            )
        restored = jax.tree.unflatten(jax.tree.structure(opt_state), jax.tree.leaves(got["opt_state"]))
    except (ValueError, KeyError, FileNotFoundError, TypeError, IndexError) as e:
        raise CheckpointError(
            f"optimizer_state: keep needs the same model and trainable set as the previous stage "
            f"({str(e).splitlines()[0]}); use optimizer_state: reset"
        ) from None
    return jax.tree.map(
        lambda x: (
            x._replace(count=jnp.zeros_like(x.count)) if isinstance(x, optax.ScaleByScheduleState) else x
        ),
        restored,
        is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState),
    )
