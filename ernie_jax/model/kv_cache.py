"""The key/value cache of generation: per attention layer, preallocated [B, K, T, D] buffers for
the kv heads only (grouped-query attention never repeats them). Prompts are left-padded, so every
row writes its next token into the same slot and a step is one in-place update.

Heads before positions, so a decode step's q . k is a batched matmul over (row, kv head) without
transposing the cache (2.6x faster than [B, T, K, D] on CPU at B 8, T 1152). A stack's caches stay
one array [L, ..., B, K, T, D] that the layer scan carries; a layer sees it through a view (`at`:
its indices on the leading axes) and writes only its new tokens in place, so a decode step never
copies the cache (scanning it as per-layer inputs and outputs rebuilt it every step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """k, v [*lead, B, K, T, D]; `at` indexes `lead` (a full index: this is one layer's view)."""

    k: jax.Array
    v: jax.Array
    at: tuple = ()

    @classmethod
    def zeros(cls, lead: tuple[int, ...], batch: int, length: int, kv_heads: int, head_dim: int, dtype):
        shape = (*lead, batch, kv_heads, length, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def depth(self) -> int:
        """Size of the next leading axis (the layers a scan over this cache visits)."""
        return self.k.shape[len(self.at)]

    def select(self, i) -> KVCache:
        return KVCache(self.k, self.v, (*self.at, i))

    def release(self) -> KVCache:
        """The view one level up (undoes `select`)."""
        return KVCache(self.k, self.v, self.at[:-1])

    def layer(self) -> tuple[jax.Array, jax.Array]:
        """This layer's k, v [B, K, T, D]."""
        return (self.k[self.at], self.v[self.at]) if self.at else (self.k, self.v)

    def write(self, k: jax.Array, v: jax.Array, slot: jax.Array) -> KVCache:
        """k, v [B, S, K, D] of new tokens stored in slots slot .. slot + S - 1 (the same for every
        row: prompts are left-padded), one in-place update of the carried array."""
        lead = len(self.at)

        def put(buf, new):
            update = jnp.swapaxes(new, 1, 2).astype(buf.dtype)[(None,) * lead]
            return jax.lax.dynamic_update_slice(buf, update, (*self.at, 0, 0, slot, 0))

        return KVCache(put(self.k, k), put(self.v, v), self.at)
