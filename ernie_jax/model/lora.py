"""LoRA as a transform of a built model: adapters are attached to the targeted Linear layers and
routed-expert stacks, and every other weight becomes a `FrozenParam`, a variable type the optimizer
never sees (trainers keep it as the state's `base`).

    model = apply_lora(build_model(cfg, rngs), cfg.lora, key)

A Linear at `units/moe/self_attn/q_proj` with kernel [U, H, Q] (stacked over U units) gets
`q_proj/lora/a` [U, H, r] and `q_proj/lora/b` [U, r, Q]; an expert stack `units/moe/mlp/experts`
gets `experts/gate_proj_lora/a` [U, E, H, r] and so on. Leading (stacked) dims follow the kernel,
logical axis names follow its axes, so scans, pipeline stages and sharding rules treat adapters like
the weights beside them. B starts at zero: a fresh adapter leaves the model's outputs unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.config import LORA_TARGETS, Config, LoraConfig
from ernie_jax.errors import ConfigError
from ernie_jax.model.layers import Linear
from ernie_jax.model.moe import PROJECTIONS, Experts
from ernie_jax.model.param_parts import param_part
from ernie_jax.ops.lora import ExpertKernel, low_rank, lora_scale

# model component (param_parts.COMPONENTS) -> the lora.targets group that names it
GROUP_OF_COMPONENT = {
    "attention": "attention",
    "dense_ffn": "mlp",
    "shared_experts": "shared_experts",
    "routed_experts": "experts",
    "vision_experts": "vision_experts",
    "vit": "vit",
    "adapter": "adapter",
}


DEFAULT_TARGETS = ("attention", "mlp", "shared_experts", "experts")


class LoraParam(nnx.Param):
    """An adapter matrix: trainable (a Param), told apart from the base for export and init_from."""


class FrozenParam(nnx.Variable):
    """A base weight under LoRA: read by the model, never differentiated or updated."""


class DropoutSeed(nnx.Variable):
    """An adapter's dropout key [..., 2] (uint32): zeros in the state (dropout off); the train step
    fills it per micro-batch (`with_dropout_seeds`) for the forward pass only."""


class LoraAdapter(nnx.Module):
    """a [..., K, r] (uniform +-1/sqrt(K), PEFT's default), b [..., r, N] = 0;
    y += scale * dropout(x) a b."""

    def __init__(
        self, a, b, scale: float, axes_a: tuple, axes_b: tuple, dropout: float = 0.0, experts: bool = False
    ):
        self.a = LoraParam(a, axes=axes_a)
        self.b = LoraParam(b, axes=axes_b)
        self.scale, self.rate = scale, dropout
        # one key per stacked layer (an expert stack's rows share it: each row gets its own mask)
        lead = a.shape[: -3 if experts else -2]
        self.dropout_seed = (
            # the stacked dims stay unnamed, as every stacked variable's (the layer axis goes to the stages)
            DropoutSeed(jnp.zeros((*lead, 2), jnp.uint32), axes=("norm",)) if dropout else None
        )

    def _seed(self):
        return None if self.dropout_seed is None else self.dropout_seed[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        return low_rank(x, a, b, self.scale, self.rate, self._seed())

    def expert_kernel(self, w: jax.Array, dtype) -> ExpertKernel:
        a, b = self.a[...].astype(dtype), self.b[...].astype(dtype)
        return ExpertKernel(w, a, b, self.scale, self.rate, self._seed())


def module_path(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def target_group(path, node) -> str | None:
    """The lora.targets group of a Linear / Experts module at `path`, or None (routers, embeddings,
    the LM head and the MTP block are reached by patterns only)."""
    return GROUP_OF_COMPONENT.get(param_part(tuple(path) + ("kernel",)).component)


def targeted_modules(model: nnx.Module, targets: tuple[str, ...]) -> list[tuple[str, nnx.Module]]:
    """(path, module) of every Linear / Experts stack that `targets` (groups or patterns) selects;
    a ConfigError names a target that selects nothing and the groups this model has."""
    candidates = [
        (module_path(p), node, target_group(p, node))
        for p, node in nnx.iter_graph(model)
        if isinstance(node, (Linear, Experts))
    ]
    chosen, present = {}, sorted({g for _, _, g in candidates if g}, key=LORA_TARGETS.index)
    if not targets:  # the default: every language-model group this model has
        targets = tuple(g for g in DEFAULT_TARGETS if g in present)
    example = next((p for p, _, g in candidates if g == "attention"), candidates[0][0])
    for t in targets:
        hits = [
            (path, node)
            for path, node, group in candidates
            if (group == t if t in LORA_TARGETS else re.search(t, path))
        ]
        if not hits:
            raise ConfigError(
                f"lora.targets: {t!r} matches nothing in this model; its groups are {', '.join(present)} "
                f"(patterns match module paths such as {example})"
            )
        chosen.update({path: node for path, node in hits})
    return sorted(chosen.items())


def _adapter(
    kernel: nnx.Variable, rank: int, scale: float, key: jax.Array, dropout: float, experts: bool = False
) -> LoraAdapter:
    w = kernel[...]
    axes = tuple(kernel.get_metadata().get("axes") or (None,) * w.ndim)
    *lead, k, n = w.shape
    bound = 1.0 / k**0.5
    a = jax.random.uniform(key, (*lead, k, rank), jnp.float32, -bound, bound)
    b = jnp.zeros((*lead, rank, n), jnp.float32)
    return LoraAdapter(a, b, scale, axes[:-1] + ("lora",), axes[:-2] + ("lora", axes[-1]), dropout, experts)


def apply_lora(model: nnx.Module, cfg: LoraConfig, key: jax.Array) -> nnx.Module:
    """Attach adapters to the targets of `cfg` (in place) and freeze every other weight; returns `model`."""
    scale = lora_scale(cfg.alpha, cfg.rank, cfg.rslora)
    targets = targeted_modules(model, cfg.targets)
    model.lora_config = cfg  # static: a rebuilt graph (e.g. generation's dropless twin) has the adapters too
    _freeze(model, jnp.dtype(cfg.base_dtype) if cfg.base_dtype else None)
    for i, (_, node) in enumerate(targets):
        k = jax.random.fold_in(key, i)
        if isinstance(node, Linear):
            node.lora = nnx.data(_adapter(node.kernel, cfg.rank, scale, k, cfg.dropout))
        else:
            for j, name in enumerate(PROJECTIONS):
                key_j = jax.random.fold_in(k, j)
                adapter = _adapter(getattr(node, name), cfg.rank, scale, key_j, cfg.dropout, experts=True)
                setattr(node, name + "_lora", nnx.data(adapter))
    return model


def _freeze(model: nnx.Module, dtype) -> None:
    """Every Param of the model becomes a FrozenParam (in `dtype` when given), metadata kept."""
    for _, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Module):
            continue
        for name, value in list(vars(node).items()):
            if isinstance(value, nnx.Param) and not isinstance(value, LoraParam):
                w = value[...]
                setattr(
                    node, name, FrozenParam(w if dtype is None else w.astype(dtype), **value.get_metadata())
                )


def with_dropout_seeds(buffers: dict, key: jax.Array) -> dict:
    """`buffers` with every adapter's dropout seed [..., 2] filled from `key` (a different key per
    adapter, stacked layer and expert stack): the masks of one micro-batch's forward pass."""

    def fill(path, leaf):
        if getattr(path[-1], "key", None) != "dropout_seed":
            return leaf
        k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
        n = math.prod(leaf.shape[:-1])
        return jax.random.key_data(jax.random.split(k, n)).reshape(leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, buffers)


def merged_kernel(w, a, b, scale: float):
    """W + scale * a b for a (stacked) kernel and its adapter, any array library (numpy on export)."""
    return w + scale * (a @ b)


def base_config(cfg: Config) -> Config:
    """The config of the model under the adapters (what checkpoint.init_from and export read)."""
    return dataclasses.replace(cfg, lora=LoraConfig())
