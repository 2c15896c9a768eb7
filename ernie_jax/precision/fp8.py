"""FP8 matmuls for NNX as quantize-dequantize around ordinary dots (the pattern XLA rewrites into
FP8 GEMMs on Hopper-class GPUs; on CPU it is emulated with the same numerics).

Forward: activations and weights rounded to e4m3 with a scale; backward: the output gradient
rounded to e5m2 (custom VJPs, straight-through elsewhere); accumulation in fp32.
Recipes (`precision.fp8_recipe`):
- current: one scale per tensor from its amax at this step;
- blockwise: activations per 1x128 tile of the contraction dim, weights per 128x128 block
  (DeepSeek-V3 / ERNIE 4.5 fine-grained scaling);
- delayed: one scale per tensor from the max of its amax history (the last
  `precision.fp8_amax_history` steps, Transformer-Engine style). Histories live in `Fp8Meta`
  variables (non-trainable, saved in checkpoints). The step learns each tensor's current amax as
  the cotangent of its history row (the quantizers' custom VJPs emit it, forward and backward
  tensors alike) and `update_histories` rolls it in after the optimizer step.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
FMAX = {E4M3: 448.0, E5M2: 57344.0}
BLOCK = 128


def _qdq(x: jax.Array, dtype, amax: jax.Array) -> jax.Array:
    """Round x to `dtype` with scale amax / fmax (amax broadcastable to x), back to x's dtype."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(amax.astype(jnp.float32), 1e-12) / FMAX[dtype]
    q = jnp.clip(x32 / scale, -FMAX[dtype], FMAX[dtype]).astype(dtype)
    return (q.astype(jnp.float32) * scale).astype(x.dtype)


def _block(n: int) -> int:
    return BLOCK if n % BLOCK == 0 else n


def qdq_tensor(x: jax.Array, dtype=E4M3) -> jax.Array:
    return _qdq(x, dtype, jax.lax.stop_gradient(jnp.max(jnp.abs(x))))


def qdq_rows(x: jax.Array, dtype=E4M3) -> jax.Array:
    """One scale per 1 x 128 tile along the last dim."""
    b = _block(x.shape[-1])
    t = x.reshape(*x.shape[:-1], x.shape[-1] // b, b)
    amax = jax.lax.stop_gradient(jnp.max(jnp.abs(t), axis=-1, keepdims=True))
    return _qdq(t, dtype, amax).reshape(x.shape)


def qdq_blocks(w: jax.Array, dtype=E4M3) -> jax.Array:
    """One scale per 128 x 128 block of the last two dims."""
    k, n = w.shape[-2:]
    bk, bn = _block(k), _block(n)
    t = w.reshape(*w.shape[:-2], k // bk, bk, n // bn, bn)
    amax = jax.lax.stop_gradient(jnp.max(jnp.abs(t), axis=(-3, -1), keepdims=True))
    return _qdq(t, dtype, amax).reshape(w.shape)


def _straight_through(q: Callable[[jax.Array], jax.Array]):
    """Quantize in the forward pass; pass the gradient through unchanged."""

    @jax.custom_vjp
    def f(x):
        return q(x)

    f.defvjp(lambda x: (q(x), None), lambda _, g: (g,))
    return f


@jax.custom_vjp
def grad_e5m2(y: jax.Array) -> jax.Array:
    """Identity forward; the incoming gradient is rounded to e5m2 (per-tensor current scale)."""
    return y


grad_e5m2.defvjp(lambda y: (y, None), lambda _, g: (qdq_tensor(g, E5M2),))


class Fp8:
    """Quantizers of one recipe: `act` (e4m3), `weight` (e4m3), `out` (e5m2 gradient)."""

    def __init__(self, recipe: str):
        if recipe == "current":
            self.act = _straight_through(qdq_tensor)
            self.weight = _straight_through(qdq_tensor)
        elif recipe == "blockwise":
            self.act = _straight_through(qdq_rows)
            self.weight = _straight_through(qdq_blocks)
        else:
            raise ValueError(f"unknown fp8 recipe {recipe}")
        self.out = grad_e5m2
        self.recipe = recipe

    # per-site access used by the expert matmuls (one quantizer for every site here)
    def act_for(self, i: int):
        return self.act

    def weight_for(self, i: int):
        return self.weight

    def out_for(self, i: int):
        return self.out

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        """Drop-in jax.lax.dot_general for Linear: rhs is the [in, out] kernel."""
        y = jax.lax.dot_general(
            self.act(lhs), self.weight(rhs), dimension_numbers, preferred_element_type=jnp.float32
        )
        return self.out(y).astype(lhs.dtype)

    def __hash__(self):
        return hash(("fp8", self.recipe))

    def __eq__(self, other):
        return isinstance(other, Fp8) and other.recipe == self.recipe


class Fp8Meta(nnx.Variable):
    """Amax histories [..., rows, H] of delayed-scaling FP8 tensors; changed only by update_histories."""


def _amax_used(hist: jax.Array, current: jax.Array) -> jax.Array:
    """max over the history; the current amax until a history has a value (the first step)."""
    past = jnp.max(hist)
    return jnp.where(past > 0, past, current)


def _slot(amax: jax.Array, like: jax.Array) -> jax.Array:
    """The cotangent that reports `amax` for a history row: amax at position 0, zeros elsewhere."""
    return jnp.zeros_like(like).at[0].set(amax.astype(like.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def qdq_delayed(x: jax.Array, hist: jax.Array, dtype=E4M3) -> jax.Array:
    """Forward e4m3 rounding with the history's scale; the history row's cotangent is x's amax."""
    return _qdq(x, dtype, _amax_used(hist, jnp.max(jnp.abs(x))))


def _qdq_delayed_fwd(x, hist, dtype):
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return _qdq(x, dtype, _amax_used(hist, amax)), (amax, hist)


def _qdq_delayed_bwd(dtype, res, g):
    amax, hist = res
    return g, _slot(amax, hist)


qdq_delayed.defvjp(_qdq_delayed_fwd, _qdq_delayed_bwd)


@jax.custom_vjp
def grad_e5m2_delayed(y: jax.Array, hist: jax.Array) -> jax.Array:
    """Identity forward; the gradient is rounded to e5m2 with the history's scale and its amax reported."""
    return y


def _grad_delayed_fwd(y, hist):
    return y, hist


def _grad_delayed_bwd(hist, g):
    amax = jnp.max(jnp.abs(g)).astype(jnp.float32)
    return _qdq(g, E5M2, _amax_used(hist, amax)), _slot(amax, hist)


grad_e5m2_delayed.defvjp(_grad_delayed_fwd, _grad_delayed_bwd)


class DelayedFp8:
    """Delayed-scaling quantizers. A Linear keeps a history [3, H] (input, kernel, output gradient);
    an expert group keeps [8, H]: inputs x and h, kernels gate/up/down, output gradients gate/up/down
    (rows ACT_X, ACT_H, W0..W2, OUT0..OUT2)."""

    recipe = "delayed"
    ACT_X, ACT_H, W0, OUT0 = 0, 1, 2, 5
    EXPERT_ROWS = 8

    def __init__(self, history: int):
        self.history = history

    def dot_general_with(self, hist: jax.Array):
        def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
            y = jax.lax.dot_general(
                qdq_delayed(lhs, hist[0]),
                qdq_delayed(rhs, hist[1]),
                dimension_numbers,
                preferred_element_type=jnp.float32,
            )
            return grad_e5m2_delayed(y, hist[2]).astype(lhs.dtype)

        return dot_general

    def bind(self, hist: jax.Array) -> "BoundExperts":
        return BoundExperts(hist)

    def __hash__(self):
        return hash(("fp8-delayed", self.history))

    def __eq__(self, other):
        return isinstance(other, DelayedFp8) and other.history == self.history


class BoundExperts:
    """Expert-matmul quantizers reading one expert group's history rows."""

    def __init__(self, hist: jax.Array):
        self.hist = hist

    def act_for(self, i: int):
        return lambda x: qdq_delayed(x, self.hist[DelayedFp8.ACT_X + i])

    def weight_for(self, i: int):
        return lambda w: qdq_delayed(w, self.hist[DelayedFp8.W0 + i])

    def out_for(self, i: int):
        return lambda y: grad_e5m2_delayed(y, self.hist[DelayedFp8.OUT0 + i])


class ShardedBoundExperts(BoundExperts):
    """The quantizers used inside an expert-parallel `shard_map`: every device scales with the amax
    over all devices (pmax over `axes`), so the result equals the single-device run, and reports
    amax / `devices` because shard_map sums a replicated input's cotangent over all devices."""

    def __init__(self, hist: jax.Array, axes: tuple[str, ...], devices: int):
        super().__init__(hist)
        self.axes, self.devices = axes, devices

    def act_for(self, i: int):
        return lambda x: qdq_delayed_sharded(x, self.hist[DelayedFp8.ACT_X + i], self.axes, self.devices)

    def out_for(self, i: int):
        return lambda y: grad_e5m2_delayed_sharded(y, self.hist[DelayedFp8.OUT0 + i], self.axes, self.devices)


def _global_amax(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.pmax(jnp.max(jnp.abs(x)).astype(jnp.float32), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def qdq_delayed_sharded(x, hist, axes, devices):
    return _qdq(x, E4M3, _amax_used(hist, _global_amax(x, axes)))


def _qdq_sharded_fwd(x, hist, axes, devices):
    amax = _global_amax(x, axes)
    return _qdq(x, E4M3, _amax_used(hist, amax)), (amax, hist)


def _qdq_sharded_bwd(axes, devices, res, g):
    amax, hist = res
    return g, _slot(amax / devices, hist)


qdq_delayed_sharded.defvjp(_qdq_sharded_fwd, _qdq_sharded_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def grad_e5m2_delayed_sharded(y, hist, axes, devices):
    return y


def _grad_sharded_fwd(y, hist, axes, devices):
    return y, hist


def _grad_sharded_bwd(axes, devices, hist, g):
    amax = _global_amax(g, axes)
    return _qdq(g, E5M2, _amax_used(hist, amax)), _slot(amax / devices, hist)


grad_e5m2_delayed_sharded.defvjp(_grad_sharded_fwd, _grad_sharded_bwd)


def update_histories(buffers: dict, amax: dict) -> dict:
    """After the step: roll each Fp8Meta history and put this step's amax (the cotangent's slot 0,
    max over micro-batches) in front. Other buffers pass through."""

    def roll(path, old, new):
        if "fp8_meta" not in jax.tree_util.keystr(path):
            return old
        return jnp.concatenate([new[..., :1], old[..., :-1]], axis=-1)

    return jax.tree_util.tree_map_with_path(roll, buffers, amax)


@functools.lru_cache(maxsize=None)
def fp8_for(mode: str, recipe: str, part: str, history: int = 16):
    """The quantizers for `part` ('linear' or 'experts') under precision.fp8 = `mode`, or None."""
    if mode == "off" or (mode == "experts" and part != "experts"):
        return None
    if recipe == "delayed":
        return DelayedFp8(history)
    return Fp8(recipe)
