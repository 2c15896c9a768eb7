"""Rotary position embeddings. ERNIE rotates interleaved pairs (x[2i], x[2i+1]) (GPT-J style),
not NeoX halves; inv_freq_i = theta^(-2i/D). See ERNIE45_SPEC.md section 2."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, theta: float) -> jax.Array:
    """[D/2] inverse frequencies theta^(-2i/D)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """positions [B, S] -> angles [B, S, D/2] (fp32)."""
    return positions.astype(jnp.float32)[..., None] * inv_frequencies(head_dim, theta)


def apply_interleaved_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate pairs of x [B, S, N, D] by angles [B, S, D/2]; fp32 math, result in x.dtype."""
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = x32[..., 0], x32[..., 1]
    out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
