"""Rotary position embeddings. ERNIE rotates interleaved pairs (x[2i], x[2i+1]) (GPT-J style),
not NeoX halves; inv_freq_i = theta^(-2i/D). As in transformers
models/ernie4_5/modeling_ernie4_5.py."""

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


def rope_angles_3d(positions: jax.Array, head_dim: int, theta: float, t_frequencies: int) -> jax.Array:
    """ERNIE-VL 3D RoPE: positions [B, S, 3] = (t, h, w) -> angles [B, S, D/2].

    The `t_frequencies` lowest frequencies rotate by t; of the rest, even indices rotate by h and
    odd by w (vLLM rotary_embedding/ernie45_vl_rope.py, freq_allocation). Text tokens have
    t = h = w, which makes this exactly the 1D rotation.
    """
    half = head_dim // 2
    i = jnp.arange(half)
    axis = jnp.where(i >= half - t_frequencies, 0, jnp.where(i % 2 == 0, 1, 2))  # 0 t, 1 h, 2 w
    pos = jnp.take(positions.astype(jnp.float32), axis, axis=-1)  # [B, S, D/2]
    return pos * inv_frequencies(head_dim, theta)


def vision_rope_angles(hw: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """ViT 2D RoPE: patch (h, w) ids [N, 2] -> angles [N, D/2] = concat(h * f, w * f), with the
    D/4 frequencies f_j = theta^(-2j/(D/2)) (Qwen2-VL style, used by the ERNIE-VL ViT)."""
    f = inv_frequencies(head_dim // 2, theta)
    hw = hw.astype(jnp.float32)
    return jnp.concatenate([hw[:, :1] * f, hw[:, 1:2] * f], axis=-1)


def apply_half_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """NeoX-style rotation of x [N, heads, D]: pair (j, j + D/2) rotates by angles[:, j] ([N, D/2])."""
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
