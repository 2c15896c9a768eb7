"""The ERNIE-4.5-VL vision side: a ViT over flattened 14x14 patches and the adapter (resampler)
that merges 2x2 patches and frame pairs into LLM-width tokens.
As in transformers models/ernie4_5_vl_moe/modeling_ernie4_5_vl_moe.py.

Inputs are already patchified: `patches` [N, C*P*P], every image/frame's patches ordered by 2x2
merge windows. Which patch belongs to which frame, its (h, w) grid position and how merged rows
pair up over time depend only on `grid_thw`; `vision_layout` computes that on the host (numpy), so
the jitted model sees fixed-shape index arrays and no Python branching on data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ModelConfig, VisionConfig
from ernie_jax.model.attention import attention_spec
from ernie_jax.model.layers import LayerNorm, Linear, RMSNorm
from ernie_jax.model.rope import apply_half_rope, vision_rope_angles
from ernie_jax.ops.attention import AttentionSpec
from ernie_jax.parallel.context import sharded_attention
from ernie_jax.precision.remat import remat_policy


def vision_layout(
    grid_thw, spatial_merge: int, num_patches: int | None = None, num_rows: int | None = None
) -> dict[str, np.ndarray]:
    """Host-side index arrays for the vision items described by `grid_thw` [n, 3] (t, h, w patches).

    patch_hw [N, 2]   (h, w) of every patch, in 2x2-window order (ViT 2D RoPE)
    frame_ids [N]     1-based frame number over all items; attention stays inside a frame; 0 = padding
    pair_first/pair_second [M]  merged rows paired over time (frames 2j, 2j+1; an image pairs with
                      itself); M = sum over items of (t // 2 or 1) * (h/m) * (w/m) output tokens
    row_valid [M]     False for padding rows
    Pass num_patches / num_rows to pad to fixed sizes (batches of varying images, one compile).
    """
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = spatial_merge
    hw, frames, first, second = [], [], [], []
    frame, row_offset = 0, 0
    for t, h, w in grid:
        if h % m or w % m:
            raise ValueError(f"grid_thw row {(t, h, w)}: h and w must be multiples of the spatial merge {m}")
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        order = np.stack(
            [
                hh.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
                ww.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
            ],
            axis=-1,
        )
        hw.append(np.tile(order, (t, 1)))
        frames.append(np.repeat(np.arange(frame + 1, frame + t + 1), h * w))
        frame += t
        rows = h * w // (m * m)
        evens = range(0, t, 2)
        odds = range(1, t, 2) if t > 1 else range(0, 1)
        for a, b in zip(evens, odds):
            first.append(row_offset + a * rows + np.arange(rows))
            second.append(row_offset + b * rows + np.arange(rows))
        row_offset += t * rows
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape, np.int64)
    out = {
        "patch_hw": cat(hw, (0, 2)),
        "frame_ids": cat(frames, (0,)),
        "pair_first": cat(first, (0,)),
        "pair_second": cat(second, (0,)),
    }
    out["row_valid"] = np.ones(len(out["pair_first"]), bool)
    n, rows = len(out["frame_ids"]), len(out["pair_first"])
    for key, size, want in (
        ("patch_hw", n, num_patches),
        ("frame_ids", n, num_patches),
        ("pair_first", rows, num_rows),
        ("pair_second", rows, num_rows),
        ("row_valid", rows, num_rows),
    ):
        if want is None:
            continue
        if want < size or (key == "patch_hw" and want % (m * m)):
            raise ValueError(
                f"cannot pad {key} of length {size} to {want} (too small or not a multiple of {m * m})"
            )
        pad = [(0, want - size)] + [(0, 0)] * (out[key].ndim - 1)
        out[key] = np.pad(out[key], pad)
    out = {k: v.astype(np.int32) if v.dtype != bool else v for k, v in out.items()}
    return out


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class VisionAttention(nnx.Module):
    """Bidirectional MHA inside each frame (one attention segment per frame, so patches of
    different images never mix and no P x P mask exists); fused qkv with bias; 2D half-split RoPE."""

    def __init__(
        self, dim: int, num_heads: int, *, kw: dict, spec: AttentionSpec = AttentionSpec(causal=False)
    ):
        self.num_heads, self.spec = num_heads, spec
        self.qkv = Linear(dim, 3 * dim, axes=("embed", "q_heads"), bias=True, **kw)
        self.proj = Linear(dim, dim, axes=("q_heads", "embed"), bias=True, **kw)

    def __call__(self, x, angles, frame_ids):
        """x [P, dim], angles [P, d/2], frame_ids [P] (0 = padding, itself one segment) -> [P, dim]."""
        n, dim = x.shape
        d = dim // self.num_heads
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, d), 1, 0)
        q, k = apply_half_rope(q, angles), apply_half_rope(k, angles)
        seg = frame_ids[None]
        out = sharded_attention(q[None], k[None], v[None], seg, None, self.spec)
        return self.proj(out.reshape(n, dim))


class VisionBlock(nnx.Module):
    """Pre-LN: x += Attn(LN1 x); x += FC2(QuickGELU(FC1(LN2 x)))."""

    def __init__(self, v: VisionConfig, m: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, std=m.init_std, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
        pd = kw["param_dtype"]
        self.norm1 = LayerNorm(v.hidden_size, v.layer_norm_eps, param_dtype=pd)
        self.attn = VisionAttention(v.hidden_size, v.num_heads, kw=kw, spec=attention_spec(m, causal=False))
        self.norm2 = LayerNorm(v.hidden_size, v.layer_norm_eps, param_dtype=pd)
        self.fc1 = Linear(v.hidden_size, v.intermediate_size, axes=("embed", "mlp"), bias=True, **kw)
        self.fc2 = Linear(v.intermediate_size, v.hidden_size, axes=("mlp", "embed"), bias=True, **kw)

    def __call__(self, x, angles, frame_ids):
        x = x + self.attn(self.norm1(x), angles, frame_ids)
        return x + self.fc2(quick_gelu(self.fc1(self.norm2(x))))


class VisionTransformer(nnx.Module):
    """patches [N, C*P*P] -> features [N, D]; blocks stacked and scanned."""

    def __init__(self, v: VisionConfig, m: ModelConfig, *, rngs: nnx.Rngs):
        """`m`: the decoder's settings the ViT shares (dtypes, init scale, remat, attention backend)."""
        self.vision_cfg, self.model_cfg = v, m
        dt, pd = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        self.patch_embed = Linear(
            v.in_channels * v.patch_size**2,
            v.hidden_size,
            axes=("mlp", "embed"),
            rngs=rngs,
            std=m.init_std,
            dtype=dt,
            param_dtype=pd,
        )

        @nnx.split_rngs(splits=v.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return VisionBlock(v, m, rngs=r)

        self.blocks = make(rngs)
        self.ln = LayerNorm(v.hidden_size, v.layer_norm_eps, param_dtype=pd)

    def __call__(self, patches: jax.Array, patch_hw: jax.Array, frame_ids: jax.Array) -> jax.Array:
        v, m = self.vision_cfg, self.model_cfg
        angles = vision_rope_angles(patch_hw, v.hidden_size // v.num_heads, v.rope_theta)
        x = self.patch_embed(patches)

        def apply(block, x):
            return block(x, angles, frame_ids)

        if m.remat != "none":
            apply = nnx.remat(apply, policy=remat_policy(m.remat, m.remat_names, m.remat_offload))

        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, x):
            return apply(block, x)

        return self.ln(body(self.blocks, x))


class AdapterMLP(nnx.Module):
    """LN(fc2(GELU(fc1 x))) with biases (exact GELU)."""

    def __init__(self, d_in: int, d_out: int, eps: float, *, kw: dict):
        self.fc1 = Linear(d_in, d_out, axes=("mlp", "embed"), bias=True, **kw)
        self.fc2 = Linear(d_out, d_out, axes=("mlp", "embed"), bias=True, **kw)
        self.ln = LayerNorm(d_out, eps, param_dtype=kw["param_dtype"])

    def __call__(self, x):
        return self.ln(self.fc2(jax.nn.gelu(self.fc1(x), approximate=False)))


class Adapter(nnx.Module):
    """ViT features [N, D] -> LLM tokens [M, H]: 2x2 spatial merge + MLP, frame-pair merge + MLP,
    projection to the LLM width + RMSNorm (VariableResolutionResamplerModel)."""

    def __init__(self, v: VisionConfig, m: ModelConfig, *, rngs: nnx.Rngs):
        self.merge = v.spatial_merge**2
        spatial = v.hidden_size * self.merge
        kw = dict(rngs=rngs, std=m.init_std, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
        self.spatial_linear = AdapterMLP(spatial, spatial, v.layer_norm_eps, kw=kw)
        self.temporal_linear = AdapterMLP(spatial * v.temporal_merge, spatial, v.layer_norm_eps, kw=kw)
        self.mlp = Linear(spatial, m.hidden_size, axes=("mlp", "embed"), bias=True, **kw)
        self.after_norm = RMSNorm(m.hidden_size, m.rms_norm_eps, param_dtype=kw["param_dtype"])

    def __call__(self, feats: jax.Array, pair_first: jax.Array, pair_second: jax.Array) -> jax.Array:
        x = self.spatial_linear(feats.reshape(-1, feats.shape[-1] * self.merge))
        x = jnp.concatenate([jnp.take(x, pair_first, axis=0), jnp.take(x, pair_second, axis=0)], axis=-1)
        return self.after_norm(self.mlp(self.temporal_linear(x)))
