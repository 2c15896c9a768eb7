"""The decoder's blocks and how a stack of them runs: `DecoderLayer` (pre-norm attention + dense or
MoE FFN), `MoEUnit` (dense layers then one MoE layer: one period of ERNIE's layer pattern),
`MTPLayer`; `stack_layers` builds n of a block with a leading layer axis, `scan_layers` runs a
stack as one scan (remat, pipeline-stage padding) and `scan_extend` runs it on new tokens through
the KV cache during generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ernie_jax.config import ModelConfig, MoEConfig, PrecisionConfig
from ernie_jax.model.attention import Attention, attention_spec
from ernie_jax.model.kv_cache import KVCache
from ernie_jax.model.layers import Linear, RMSNorm, SwiGLU
from ernie_jax.model.moe import MoEBlock
from ernie_jax.ops import matmul
from ernie_jax.parallel.mesh import constrain_batch
from ernie_jax.precision.fp8 import fp8_for
from ernie_jax.precision.remat import checkpoint_name, remat_policy


@struct.dataclass
class BlockContext:
    """What every decoder block reads besides the residual stream; each field is [B,S,...]."""

    angles: jax.Array  # [B,S,D/2] RoPE angles
    token_mask: jax.Array  # [B,S] bool: real tokens (padding takes no expert slot)
    modality: jax.Array  # [B,S] 0 text, 1 vision (heterogeneous MoE routing)
    segment_ids: jax.Array | None = None  # [B,S] packed documents (None: one per row)
    token_index: jax.Array | None = None  # [B,S] original positions of reordered tokens (context parallelism)


class DecoderLayer(nnx.Module):
    """x = x + Attn(RMSNorm(x)); x = x + FFN(RMSNorm(x)), FFN dense SwiGLU, or MoE when `moe` is given."""

    def __init__(
        self,
        m: ModelConfig,
        moe: MoEConfig | None,
        precision: PrecisionConfig,
        *,
        rngs: nnx.Rngs,
        expert_parallel: bool = False,
    ):
        kw = dict(
            rngs=rngs,
            std=m.init_std,
            dtype=jnp.dtype(m.dtype),
            param_dtype=jnp.dtype(m.param_dtype),
            dot_general=linear_dot_general(precision),
        )
        self.input_layernorm = RMSNorm(m.hidden_size, m.rms_norm_eps, param_dtype=kw["param_dtype"])
        self.self_attn = Attention(
            m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, spec=attention_spec(m, causal=True), **kw
        )
        self.post_attention_layernorm = RMSNorm(m.hidden_size, m.rms_norm_eps, param_dtype=kw["param_dtype"])
        if moe is not None:
            p = precision
            experts_fp8 = fp8_for(p.fp8, p.fp8_recipe, "experts", p.fp8_amax_history)
            self.mlp = MoEBlock(m.hidden_size, moe, fp8=experts_fp8, expert_parallel=expert_parallel, **kw)
        else:
            self.mlp = SwiGLU(m.hidden_size, m.intermediate_size, **kw)
        self.is_moe = moe is not None

    def __call__(self, x, ctx: BlockContext):
        x = x + self.self_attn(self.input_layernorm(x), ctx.angles, ctx.segment_ids, ctx.token_index)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, stats = self.mlp(h, ctx.token_mask, ctx.modality)
        else:
            y, stats = checkpoint_name(self.mlp(h), "mlp_out"), {}
        return x + y, stats

    def extend(self, x, ctx: BlockContext, cache: KVCache, slots, prefill: bool):
        """The block on new tokens during generation (attention through the KV cache) -> (x, cache);
        slots = (first new slot, first real slot per row)."""
        a, cache = self.self_attn.extend(
            self.input_layernorm(x), ctx.angles, cache, *slots, ctx.segment_ids, prefill
        )
        x = x + a
        h = self.post_attention_layernorm(x)
        y = self.mlp(h, ctx.token_mask, ctx.modality)[0] if self.is_moe else self.mlp(h)
        return x + y, cache


def scan_extend(stack, x, ctx, cache, slots, prefill: bool):
    """`extend` of a stacked layer (or unit) over its leading axis. The stack's cache (a KVCache, or
    a dict of them for units) rides in the carry and each layer gets a view of its own slice; a
    stack of one layer has no layer axis in its cache (`KVCache.zeros`), so its write and read
    are one buffer (a depth-1 axis made XLA:CPU copy the cache ~8 times per decode step)."""
    views = lambda c, f: jax.tree.map(f, c, is_leaf=lambda a: isinstance(a, KVCache))
    depth = stack_depth(stack)

    @nnx.scan(in_axes=(nnx.Carry, 0, None, None, 0), out_axes=nnx.Carry)
    def body(carry, layer, ctx, slots, i):
        x, cache = carry
        if depth == 1:
            return layer.extend(x, ctx, cache, slots, prefill)
        x, cache = layer.extend(x, ctx, views(cache, lambda c: c.select(i)), slots, prefill)
        return x, views(cache, lambda c: c.release())

    return body((x, cache), stack, ctx, slots, jnp.arange(depth))


def unstack(stack) -> list:
    """A stack's layers (or units) as separate modules, each holding its own parameter buffers: one
    slice of every stacked variable per layer, taken once (for the per-layer decode loop)."""
    graphdef, state = nnx.split(stack)
    return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(stack_depth(stack))]


def stack_depth(stack) -> int:
    """Layers (or units) in a stack: the leading axis of its params (LoRA / FP8 state rides along)."""
    return jax.tree.leaves(nnx.state(stack, nnx.Param))[0].shape[0]


def linear_dot_general(p: PrecisionConfig):
    """The dot_general of every Linear except router and LM head (FP8 under precision.fp8=all_linear)."""
    fp8 = fp8_for(p.fp8, p.fp8_recipe, "linear", p.fp8_amax_history)
    if fp8 is None:
        return matmul.dot_general
    return fp8 if fp8.recipe == "delayed" else fp8.dot_general  # Linear keeps the delayed state itself


def stack_layers(n: int, make, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return make(r)

    return create(rngs)


def scan_layers(stack, x, ctx, m, in_stage: bool = False, active: jax.Array | None = None):
    """Apply a stacked DecoderLayer (or unit) over its leading axis with nnx.scan; the residual
    stream is pinned batch-sharded at each block boundary (inside a pipeline stage: over the
    batch axes other than `pipeline`). `active` [L] bool: False layers pass x through and report
    zero statistics (padding units of uneven pipeline stages)."""

    def apply(layer, x, ctx):
        return layer(constrain_batch(x, in_stage), ctx)

    if m.remat != "none":
        apply = nnx.remat(apply, policy=remat_policy(m.remat, m.remat_names, m.remat_offload))
    if active is None:

        @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=(nnx.Carry, 0))
        def body(x, layer, ctx):
            return apply(layer, x, ctx)

        return body(x, stack, ctx)

    @nnx.scan(in_axes=(nnx.Carry, 0, None, 0), out_axes=(nnx.Carry, 0))
    def masked(x, layer, ctx, on):
        y, stats = apply(layer, x, ctx)
        return jnp.where(on, y, x), jax.tree.map(lambda v: jnp.where(on, v, jnp.zeros_like(v)), stats)

    return masked(x, stack, ctx, active)


class MoEUnit(nnx.Module):
    """`dense_per_unit` dense layers followed by one MoE layer (one period of the layer pattern)."""

    def __init__(
        self,
        m: ModelConfig,
        moe: MoEConfig,
        precision: PrecisionConfig,
        dense_per_unit: int,
        *,
        rngs: nnx.Rngs,
        in_stage: bool = False,
        expert_parallel: bool = False,
    ):
        self.model_cfg = m
        self.in_stage = in_stage  # inside a pipeline stage (units are the pipelined stack when there is one)
        self.dense = (
            stack_layers(dense_per_unit, lambda r: DecoderLayer(m, None, precision, rngs=r), rngs)
            if dense_per_unit
            else None
        )
        self.moe = DecoderLayer(m, moe, precision, rngs=rngs, expert_parallel=expert_parallel)

    def __call__(self, x, ctx: BlockContext):
        if self.dense is not None:
            x, _ = scan_layers(self.dense, x, ctx, self.model_cfg, self.in_stage)
        return self.moe(x, ctx)

    def extend(self, x, ctx: BlockContext, cache: dict, slots, prefill: bool):
        """cache {"dense": KVCache [dense_per_unit, ...] (absent without dense layers), "moe": KVCache}."""
        out = {}
        if self.dense is not None:
            x, out["dense"] = scan_extend(self.dense, x, ctx, cache["dense"], slots, prefill)
        x, out["moe"] = self.moe.extend(x, ctx, cache["moe"], slots, prefill)
        return x, out


class MTPLayer(nnx.Module):
    """One multi-token-prediction depth: Linear_{2H->H}([norm(emb_shifted); norm(h_prev)]) -> dense layer."""

    def __init__(self, m: ModelConfig, precision: PrecisionConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(m.param_dtype)
        self.emb_norm = RMSNorm(m.hidden_size, m.rms_norm_eps, param_dtype=pd)
        self.hidden_norm = RMSNorm(m.hidden_size, m.rms_norm_eps, param_dtype=pd)
        self.linear_proj = Linear(
            2 * m.hidden_size,
            m.hidden_size,
            axes=("concat", "embed"),
            rngs=rngs,
            std=m.init_std,
            dtype=jnp.dtype(m.dtype),
            param_dtype=pd,
            dot_general=linear_dot_general(precision),
        )
        self.block = DecoderLayer(m, None, precision, rngs=rngs)

    def __call__(self, h, emb, ctx: BlockContext):
        u = self.linear_proj(jnp.concatenate([self.emb_norm(emb), self.hidden_norm(h)], axis=-1))
        out, _ = self.block(u, ctx)
        return out
