"""The key/value cache of generation: per attention layer, preallocated [B, T, K, D] buffers for
the kv heads only (grouped-query attention never repeats them), written at per-row offsets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """k, v [..., B, T, K, D]; leading axes (layers of a stack) are scanned over with the layers."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, lead: tuple[int, ...], batch: int, length: int, kv_heads: int, head_dim: int, dtype):
        shape = (*lead, batch, length, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, k: jax.Array, v: jax.Array, write_at: jax.Array) -> KVCache:
        """k, v [B, S, K, D] of new tokens stored at positions write_at[b] .. write_at[b] + S - 1."""
        put = jax.vmap(
            lambda buf, new, at: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (at, 0, 0))
        )
        return KVCache(put(self.k, k, write_at), put(self.v, v, write_at))
