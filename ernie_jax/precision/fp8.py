"""FP8 matmuls for NNX as quantize-dequantize around ordinary dots (the pattern XLA rewrites into
FP8 GEMMs on Hopper-class GPUs; on CPU it is emulated with the same numerics).

Forward: activations and weights rounded to e4m3 with a scale; backward: the output gradient
rounded to e5m2 (custom VJPs, straight-through elsewhere); accumulation in fp32.
Recipes (`precision.fp8_recipe`):
- current: one scale per tensor from its amax at this step;
- blockwise: activations per 1x128 tile of the contraction dim, weights per 128x128 block
  (DeepSeek-V3 / ERNIE 4.5 fine-grained scaling).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

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

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        """Drop-in jax.lax.dot_general for Linear: rhs is the [in, out] kernel."""
        y = jax.lax.dot_general(self.act(lhs), self.weight(rhs), dimension_numbers,
                                preferred_element_type=jnp.float32)
        return self.out(y).astype(lhs.dtype)

    def __hash__(self):
        return hash(("fp8", self.recipe))

    def __eq__(self, other):
        return isinstance(other, Fp8) and other.recipe == self.recipe


@functools.lru_cache(maxsize=None)
def fp8_for(mode: str, recipe: str, part: str) -> Fp8 | None:
    """The quantizers for `part` ('linear' or 'experts') under precision.fp8 = `mode`, or None."""
    if mode == "off" or (mode == "experts" and part != "experts"):
        return None
    return Fp8(recipe)
