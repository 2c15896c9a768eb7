"""Grouped-query attention with an explicit head_dim, causal masking and segment ids (packing)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model.layers import DotGeneral, Linear
from ernie_jax.model.rope import apply_interleaved_rope
from ernie_jax.precision.remat import checkpoint_name


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, S] segment ids -> [B, 1, 1, S, S] bool: causal and within the same segment.

    Packed documents never see each other; padding (segment 0) only sees padding, so no row is
    fully masked and softmax stays finite.
    """
    s = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,S,N,D], k/v [B,S,K,D], mask [B,1,1,S,S] -> [B,S,N,D]. Logits and softmax in fp32."""
    b, s, n, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, s, kv, n // kv, d)
    logits = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqt,btkd->bqkgd", probs, v)
    return out.reshape(b, s, n, d)


class Attention(nnx.Module):
    """q/k/v/o projections (no bias), interleaved RoPE on q and k, GQA."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, rngs: nnx.Rngs,
                 std: float, dtype=jnp.float32, param_dtype=jnp.float32,
                 dot_general: DotGeneral = jax.lax.dot_general):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general)
        self.q_proj = Linear(hidden, num_heads * head_dim, axes=("embed", "q_heads"), **kw)
        self.k_proj = Linear(hidden, num_kv_heads * head_dim, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(hidden, num_kv_heads * head_dim, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(num_heads * head_dim, hidden, axes=("q_heads", "embed"), **kw)

    def __call__(self, x: jax.Array, angles: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B,S,H], angles [B,S,D/2] (RoPE), mask [B,1,1,S,S] -> [B,S,H]."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        q = checkpoint_name(apply_interleaved_rope(q, angles), "qkv")
        k = checkpoint_name(apply_interleaved_rope(k, angles), "qkv")
        v = checkpoint_name(v, "qkv")
        out = checkpoint_name(dot_product_attention(q, k, v, mask), "attn_out")
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
