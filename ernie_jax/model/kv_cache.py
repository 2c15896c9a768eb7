"""The key/value cache of generation: per attention layer, preallocated buffers for the kv heads
only (grouped-query attention never repeats them). Prompts are left-padded, so every row writes its
next token into the same slot and a step is one in-place update.

Heads before positions, so a decode step's q . k is a batched matmul over (row, kv head) without
transposing the cache (2.6x faster than [B, T, K, D] on CPU at B 8, T 1152); values are stored
D-major [B, K, D, T], so p . v contracts their minor dim too (XLA:CPU ran the [B, K, T, D] layout
as a loop, a fifth of a batch-8 decode step). A stack's caches stay one array [L, ..., B, K, T, D]
(values [..., D, T]; no axis for a stack of one layer) that the layer scan carries; a layer sees it
through a view (`at`: its indices on the leading axes) and writes only its new tokens in place
(scanning the cache as per-layer inputs and outputs rebuilt it every step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """k [*lead, B, K, T, D], v [*lead, B, K, D, T]; `at` indexes `lead` (a full index: this is one
    layer's view)."""

    k: jax.Array
    v: jax.Array
    at: tuple = ()

    @classmethod
    def zeros(cls, lead: tuple[int, ...], batch: int, length: int, kv_heads: int, head_dim: int, dtype):
        """lead: the stack depths above a layer; a depth of 1 gets no axis (`scan_extend`)."""
        lead = tuple(n for n in lead if n > 1)
        k = (*lead, batch, kv_heads, length, head_dim)
        v = (*lead, batch, kv_heads, head_dim, length)
        return cls(jnp.zeros(k, dtype), jnp.zeros(v, dtype))

    def select(self, i) -> KVCache:
        return KVCache(self.k, self.v, (*self.at, i))

    def release(self) -> KVCache:
        """The view one level up (undoes `select`)."""
        return KVCache(self.k, self.v, self.at[:-1])

    def layer(self) -> tuple[jax.Array, jax.Array]:
        """This layer's k [B, K, T, D] and v [B, K, D, T]."""
        return (self.k[self.at], self.v[self.at]) if self.at else (self.k, self.v)

    def per_layer(self) -> list[KVCache]:
        """A stack's cache split into one cache per layer, in stack order (row-major over `lead`)."""
        k, v = self.k.reshape(-1, *self.k.shape[-4:]), self.v.reshape(-1, *self.v.shape[-4:])
        return [KVCache(ki, vi) for ki, vi in zip(k, v)]

    def write(self, k: jax.Array, v: jax.Array, slot: jax.Array) -> KVCache:
        """k, v [B, S, K, D] of new tokens stored in slots slot .. slot + S - 1 (the same for every
        row: prompts are left-padded), one in-place update of the carried array."""
        lead = len(self.at)

        def put(buf, new, at):
            return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype)[(None,) * lead], (*self.at, *at))

        k = put(self.k, jnp.swapaxes(k, 1, 2), (0, 0, slot, 0))  # [B, K, S, D]
        v = put(self.v, jnp.transpose(v, (0, 2, 3, 1)), (0, 0, 0, slot))  # [B, K, D, S]
        return KVCache(k, v, self.at)
