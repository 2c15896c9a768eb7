"""Train state (pure pytrees: params, buffers, optimizer state, step, rng) and the optimizer factory.

params are the trainable nnx.Param leaves (fp32 master copy); buffers are every other variable
(the routing correction bias): the optimizer never sees them, pure update rules change them. Under
LoRA, params are the adapters and the frozen weights are the state's `base`: read by the forward,
never differentiated, updated or (unless lora.save_base) checkpointed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ernie_jax.config import Config, OptimizerConfig
from ernie_jax.errors import ConfigError
from ernie_jax.model.lora import FrozenParam
from ernie_jax.model.param_parts import param_part
from ernie_jax.parallel.mesh import state_shardings

TrainState = dict  # {"step", "params", "buffers", "opt_state", "rng"} (+ "base" under LoRA)


def lr_schedule(o: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup, then constant / cosine / warmup-stable-decay (1-sqrt) down to min_lr_ratio * lr."""
    total = max(total_steps, 1)
    warm = min(o.warmup_steps, total)
    peak, floor = o.learning_rate, o.learning_rate * o.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = peak * jnp.minimum(1.0, (step + 1) / max(warm, 1))
        if o.schedule == "constant":
            return warmup
        if o.schedule == "cosine":
            prog = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
            after = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * prog))
        else:  # wsd: stable until the last decay_fraction of steps, then 1 - sqrt(progress)
            decay_steps = max(int(round(total * o.decay_fraction)), 1)
            start = total - decay_steps
            prog = jnp.clip((step - start) / decay_steps, 0.0, 1.0)
            after = floor + (peak - floor) * (1.0 - jnp.sqrt(prog))
        return jnp.where(step < warm, warmup, after)

    return schedule


def param_groups(params: dict, freeze: tuple[str, ...] = ()) -> dict:
    """'frozen' (parts in `freeze`: no update, no optimizer state), 'router' (gate kernels, LR x
    router_lr_ratio), 'no_decay' (norm weights, biases), 'lora_b' (adapters' B, LR x
    lora.lora_plus_ratio), 'decay' (the rest)."""

    def label(path, _):
        part = param_part(path)
        return "frozen" if part.freeze_group in freeze else part.optimizer_group

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    o: OptimizerConfig, total_steps: int, freeze: tuple[str, ...] = (), lora_plus_ratio: float = 1.0
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW per group (router LR scaled, norms without weight decay,
    LoRA+: adapters' B at lora_plus_ratio x LR); frozen parts get `set_to_zero` (their moments are
    never allocated)."""
    sched = lr_schedule(o, total_steps)

    def adamw(lr, wd):
        return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=wd)

    groups = {
        "decay": adamw(sched, o.weight_decay),
        "no_decay": adamw(sched, 0.0),
        "router": adamw(lambda s: sched(s) * o.router_lr_ratio, o.weight_decay),
        "lora_b": adamw(lambda s: sched(s) * lora_plus_ratio, o.weight_decay),
        "frozen": optax.set_to_zero(),
    }
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
        optax.multi_transform(groups, lambda p: param_groups(p, tuple(freeze))),
    )


def split_model(model: nnx.Module) -> tuple[Any, dict, dict, dict]:
    """(graphdef, params, buffers, base) as pure dicts; base ({} without LoRA) holds the frozen weights."""
    graphdef, params, base, buffers = nnx.split(model, nnx.Param, FrozenParam, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers), nnx.to_pure_dict(base)


def model_of(graphdef, state: TrainState, params: dict | None = None) -> nnx.Module:
    """The model of a train state (with other `params`, e.g. a reference copy or zeroed adapters)."""
    parts = (state["params"] if params is None else params, state["buffers"])
    return nnx.merge(graphdef, *parts, *((state["base"],) if "base" in state else ()))


def checkpointed(state: TrainState, cfg: Config) -> TrainState:
    """What a checkpoint stores: the state, less the frozen base of a LoRA run (unless lora.save_base;
    a resumed run reads the base again from checkpoint.init_from)."""
    if "base" in state and not cfg.lora.save_base:
        return {k: v for k, v in state.items() if k != "base"}
    return state


def check_trainable(params: dict, cfg: Config) -> None:
    """LoRA whose every adapter sits in a train.freeze group would train nothing: refused."""
    if not cfg.lora.enabled or not cfg.train.freeze:
        return
    groups = {param_part(p).freeze_group for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    if groups <= set(cfg.train.freeze):
        raise ConfigError(
            f"lora.targets only reach the frozen group(s) {sorted(groups)} (train.freeze); "
            f"unfreeze them or target other groups"
        )


def opt_state_shardings(tx: optax.GradientTransformation, params: dict, mesh: Mesh):
    """Moments take the sharding of the param they mirror (ZeRO: optimizer state split like the
    params, not left to XLA, which replicates zeros); other leaves (counters) are replicated.
    `params` may be arrays or ShapeDtypeStructs with shardings."""
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {
        tuple(p): x.sharding
        for p, x in jax.tree_util.tree_leaves_with_path(params)
        if isinstance(x.sharding, NamedSharding)
    }

    def sharding_of(path, leaf):
        for k in range(len(path)):
            s = by_path.get(tuple(path[k:]))
            if s is not None and len(s.spec) <= leaf.ndim:
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_of, jax.eval_shape(tx.init, params))


def init_opt_state(tx: optax.GradientTransformation, params: dict, mesh: Mesh):
    """The optimizer state of `params`, created directly in its sharded layout."""
    return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)


def abstract_train_state(
    cfg: Config, make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[Any, TrainState]:
    """(graphdef, the train state as ShapeDtypeStructs with their shardings): what
    `init_train_state` would build, without allocating it (ahead-of-time compilation)."""
    graphdef, params, base, buffers = nnx.split(
        nnx.eval_shape(lambda: make_model(nnx.Rngs(0))), nnx.Param, FrozenParam, ...
    )
    sds = lambda tree, sh: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh
    )
    params = sds(nnx.to_pure_dict(params), state_shardings(params, mesh))
    check_trainable(params, cfg)
    buffers = sds(nnx.to_pure_dict(buffers), state_shardings(buffers, mesh))
    opt = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    scalar = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    state = {
        "step": scalar((), jnp.int32),
        "params": params,
        "buffers": buffers,
        "opt_state": sds(opt, opt_state_shardings(tx, params, mesh)),
        "rng": scalar((2,), jnp.uint32),
    }
    if cfg.lora.enabled:
        state["base"] = sds(nnx.to_pure_dict(base), state_shardings(base, mesh))
    return graphdef, state


def init_train_state(
    cfg: Config, make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[Any, TrainState]:
    """Initialise directly into the mesh layout: params/buffers by the logical-axis rules, optimizer
    moments inherit the param shardings, scalars are replicated."""
    graphdef, abstract_params, abstract_base, abstract_buffers = nnx.split(
        nnx.eval_shape(lambda: make_model(nnx.Rngs(0))), nnx.Param, FrozenParam, ...
    )
    check_trainable(nnx.to_pure_dict(abstract_params), cfg)
    shardings = tuple(state_shardings(s, mesh) for s in (abstract_params, abstract_buffers, abstract_base))

    def init():
        return split_model(make_model(nnx.Rngs(cfg.train.seed)))[1:]

    params, buffers, base = jax.jit(init, out_shardings=shardings)()
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "params": params,
        "buffers": buffers,
        "opt_state": init_opt_state(tx, params, mesh),
        "rng": jax.device_put(jax.random.key_data(jax.random.key(cfg.train.seed)), replicated),
    }
    if cfg.lora.enabled:
        state["base"] = base
    return graphdef, state
