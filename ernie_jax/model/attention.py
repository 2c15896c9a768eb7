"""The decoder's attention block: q/k/v/o projections (no bias), interleaved RoPE on q and k,
grouped-query heads, and the attention function of the configured backend (ops/attention.py),
context-parallel when the mesh has a context axis (parallel/context.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.config import ModelConfig
from ernie_jax.model.kv_cache import KVCache
from ernie_jax.model.layers import DotGeneral, Linear
from ernie_jax.model.rope import apply_interleaved_rope
from ernie_jax.ops import matmul
from ernie_jax.ops.attention import AttentionSpec, cached_attention
from ernie_jax.parallel.context import attention
from ernie_jax.precision.remat import checkpoint_name


def attention_spec(m: ModelConfig, causal: bool) -> AttentionSpec:
    """The static attention settings of `model.attention*` (0 block sizes: the backend's default)."""
    return AttentionSpec(
        backend=m.attention,
        block_q=m.attention_block_q,
        block_kv=m.attention_block_kv,
        causal=causal,
        interpret=m.attention_interpret,
    )


class Attention(nnx.Module):
    """q/k/v/o projections (no bias), interleaved RoPE on q and k, GQA."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rngs: nnx.Rngs,
        std: float,
        spec: AttentionSpec = AttentionSpec(),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        dot_general: DotGeneral = matmul.dot_general,
    ):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.spec = spec
        kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype, dot_general=dot_general)
        self.q_proj = Linear(hidden, num_heads * head_dim, axes=("embed", "q_heads"), **kw)
        self.k_proj = Linear(hidden, num_kv_heads * head_dim, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(hidden, num_kv_heads * head_dim, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(num_heads * head_dim, hidden, axes=("q_heads", "embed"), **kw)

    def _qkv(self, x, angles):
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        return apply_interleaved_rope(q, angles), apply_interleaved_rope(k, angles), v

    def __call__(
        self,
        x: jax.Array,
        angles: jax.Array,
        segment_ids: jax.Array | None = None,
        token_index: jax.Array | None = None,
    ) -> jax.Array:
        """x [B,S,H], angles [B,S,D/2] (RoPE), segment_ids [B,S] (None: one segment), token_index
        [B,S] (original positions of reordered tokens; None: natural order) -> [B,S,H]."""
        b, s, _ = x.shape
        q, k, v = (checkpoint_name(a, "qkv") for a in self._qkv(x, angles))
        out = checkpoint_name(attention(q, k, v, segment_ids, token_index, self.spec), "attn_out")
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))

    def extend(
        self,
        x: jax.Array,
        angles: jax.Array,
        cache: KVCache,
        slot: jax.Array,
        first_slot: jax.Array,
        segment_ids: jax.Array | None = None,
        prefill: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        """Generation: the new tokens x [B,S,H] have their k, v stored in cache slots slot ..
        slot + S - 1 (the same for every row: prompts are left-padded; row b's real tokens start at
        first_slot[b]) and attend. `prefill` (the prompts, from slot 0, padding marked by segment
        id 0) uses the configured backend on the prompt alone, so a long prompt never builds an
        S x T score matrix; a decode step attends over the cache."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, angles)
        cache = cache.write(k, v, slot)
        if prefill:
            out = attention(q, k, v, segment_ids, None, self.spec)
        else:
            k_all, v_all = cache.layer()
            out = cached_attention(q, k_all, v_all, slot + jnp.arange(s), first_slot)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim)), cache
