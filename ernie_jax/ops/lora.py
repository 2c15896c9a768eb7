"""Low-rank adapter math (LoRA, Hu et al. 2021): y = x W + scale * (x A) B, never forming W + A B.

A dense kernel W [K, N] has A [K, r], B [r, N]. A routed-expert kernel W [E, K, N] has per-expert
A [E, K, r], B [E, r, N]; it travels through the MoE dispatch as one `ExpertKernel` pytree, so the
dropless ragged dots, the capacity einsums and the expert-parallel shard_maps (whose specs apply to
every leaf: A and B split over experts like W) all apply the adapter where they apply W.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from ernie_jax.ops import matmul
from ernie_jax.ops.grouped_matmul import ragged_dot


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023); alpha 0 means 2 x rank."""
    alpha = alpha or 2.0 * rank
    return alpha / (rank**0.5 if rslora else rank)


def dropout(x: jax.Array, rate: float, seed: jax.Array | None) -> jax.Array:
    """Inverted dropout on an adapter's input. `seed` [2] uint32 is the raw key the train step sets
    for this adapter and micro-batch; all zeros (what the state holds: eval, generation) means off."""
    if not rate or seed is None:
        return x
    on = jnp.any(seed != 0)
    keep = jax.random.bernoulli(jax.random.wrap_key_data(seed), 1.0 - rate, x.shape)
    scale = jnp.where(on, keep.astype(x.dtype) / jnp.asarray(1.0 - rate, x.dtype), jnp.ones((), x.dtype))
    return x * scale


def low_rank(
    x: jax.Array, a: jax.Array, b: jax.Array, scale: float, rate: float = 0.0, seed: jax.Array | None = None
) -> jax.Array:
    """scale * (dropout(x) [..., K] @ a [K, r]) @ b [r, N]."""
    dims = lambda v: (((v.ndim - 1,), (0,)), ((), ()))
    x = dropout(x, rate, seed)
    h = matmul.dot_general(x, a, dims(x))
    return matmul.dot_general(h, b, dims(h)) * jnp.asarray(scale, x.dtype)


@struct.dataclass
class ExpertKernel:
    """A routed-expert kernel with its adapter: base [E, K, N], a [E, K, r], b [E, r, N]."""

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = struct.field(pytree_node=False)
    rate: float = struct.field(pytree_node=False, default=0.0)  # adapter dropout
    seed: jax.Array | None = None  # [2] uint32 dropout key (zeros: off); None without dropout

    @property
    def shape(self):
        return self.base.shape

    @property
    def dtype(self):
        return self.base.dtype

    def with_base(self, base: jax.Array) -> "ExpertKernel":
        return self.replace(base=base)


def base_of(w):
    """The dense part of a kernel (itself for a plain array)."""
    return w.base if isinstance(w, ExpertKernel) else w


def grouped_dot(xs: jax.Array, w, sizes: jax.Array) -> jax.Array:
    """Rows xs [M, K] sorted by expert (`sizes` [E] rows each) @ their expert's kernel -> [M, N]."""
    y = ragged_dot(xs, base_of(w), sizes)
    if not isinstance(w, ExpertKernel):
        return y
    h = ragged_dot(dropout(xs, w.rate, w.seed), w.a, sizes)
    return y + ragged_dot(h, w.b, sizes) * jnp.asarray(w.scale, y.dtype)


def buffer_dot(buf: jax.Array, w) -> jax.Array:
    """Expert buffers [..., E, C, K] @ their expert's kernel -> [..., E, C, N]."""
    y = matmul.expert_matmul(buf, base_of(w))
    if not isinstance(w, ExpertKernel):
        return y
    h = matmul.expert_matmul(dropout(buf, w.rate, w.seed), w.a)
    return y + matmul.expert_matmul(h, w.b) * jnp.asarray(w.scale, y.dtype)
