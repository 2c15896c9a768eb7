"""ERNIE-4.5-VL: the text decoder with heterogeneous MoE layers, plus the ViT and the adapter.

Vision tokens reach the decoder as embeddings written over the image/video placeholder tokens
(images first, then videos, each in order of appearance: the order of `pixel_values` rows).
Routing modality comes from the token ids: placeholders and the image/video start/end tokens
are vision tokens (they go to the vision experts), everything else is text.

Two entry points:
- `model(input_ids, pixel_values=..., image_grid_thw=..., mm_token_type_ids=..., ...)`: the
  transformers-style call; index arrays and 3D positions are built on the host from the grids.
- `model.forward(input_ids, positions, segment_ids, patches, layout)`: the jit-friendly core the
  trainer uses, with fixed-shape inputs prepared by the data pipeline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.config import ModelConfig, MoEConfig, PrecisionConfig, VisionConfig
from ernie_jax.errors import ConfigError
from ernie_jax.model.ernie import ErnieForCausalLM, ModelOutput
from ernie_jax.model.positions import position_ids as build_position_ids
from ernie_jax.model.vision import Adapter, VisionTransformer, vision_layout
from ernie_jax.parallel.layout import ModelLayout


def vision_token_ids(v: VisionConfig) -> tuple[int, ...]:
    return (
        v.image_token_id,
        v.video_token_id,
        v.image_start_token_id,
        v.image_end_token_id,
        v.video_start_token_id,
        v.video_end_token_id,
    )


def routing_modality(input_ids: jax.Array, v: VisionConfig) -> jax.Array:
    """1 where the token is routed to the vision experts (placeholders, start/end markers)."""
    return jnp.isin(input_ids, jnp.asarray(vision_token_ids(v))).astype(jnp.int32)


def scatter_vision(
    embeds: jax.Array,
    input_ids: jax.Array,
    rows: jax.Array,
    image_id: int,
    video_id: int,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Write vision rows [M, H] over the placeholder embeddings [B, S, H]: image placeholders take
    rows 0.. in order, video placeholders the rows after all image rows."""
    b, s, h = embeds.shape
    ids = input_ids.reshape(-1)
    img, vid = ids == image_id, ids == video_id
    rank = jnp.where(img, jnp.cumsum(img) - 1, jnp.sum(img) + jnp.cumsum(vid) - 1)
    take = jnp.take(rows, jnp.clip(rank, 0, rows.shape[0] - 1), axis=0).astype(embeds.dtype)
    write = img | vid
    if valid is not None:
        write = write & jnp.take(valid, jnp.clip(rank, 0, rows.shape[0] - 1))
    return jnp.where(write[:, None], take, embeds.reshape(-1, h)).reshape(b, s, h)


class ErnieVLForConditionalGeneration(ErnieForCausalLM):
    """Text decoder (heterogeneous MoE) + `vision_model` (ViT) + `resampler` (adapter)."""

    def __init__(
        self,
        model: ModelConfig,
        moe: MoEConfig,
        vision: VisionConfig,
        precision: PrecisionConfig = PrecisionConfig(),
        layout: ModelLayout = ModelLayout(),
        *,
        rngs: nnx.Rngs,
    ):
        super().__init__(model, moe, precision, layout, rngs=rngs, vision=vision)
        self.vision_model = VisionTransformer(vision, model, rngs=rngs)
        self.resampler = Adapter(vision, model, rngs=rngs)

    def forward(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        patches: jax.Array | None = None,
        layout: dict | None = None,
    ) -> ModelOutput:
        """input_ids [B,S]; positions [B,S,3] or [B,S]; patches [N, C*P*P] with `layout` from
        `vision_layout` (arrays, possibly padded). No host work: safe under jit."""
        v = self.vision_cfg
        embeds = self.embed(input_ids, patches, layout)
        return ErnieForCausalLM.__call__(
            self,
            input_ids,
            positions=positions,
            segment_ids=segment_ids,
            inputs_embeds=embeds,
            modality=routing_modality(input_ids, v),
        )

    def embed(self, input_ids: jax.Array, patches: jax.Array | None, layout: dict | None) -> jax.Array:
        """Token embeddings [B,S,H] with the adapter's vision rows written over the placeholders."""
        v = self.vision_cfg
        embeds = self.embed_tokens(input_ids)
        if patches is not None:
            feats = self.vision_model(patches, layout["patch_hw"], layout["frame_ids"])
            rows = self.resampler(feats, layout["pair_first"], layout["pair_second"])
            embeds = scatter_vision(
                embeds, input_ids, rows, v.image_token_id, v.video_token_id, layout.get("row_valid")
            )
        return embeds

    def __call__(
        self,
        input_ids,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        position_ids=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        attention_mask=None,
        video_advance: str = "ernie",
    ) -> ModelOutput:
        """transformers-style call. pixel_values [sum(t*h*w), C*P*P] (images) and
        pixel_values_videos (videos) with their grids [n, 3]; mm_token_type_ids [B,S] (0 text,
        1 image, 2 video; derived from the placeholder ids when omitted); position_ids [3,B,S]
        (built here when omitted); attention_mask [B,S] (1 = token, 0 = padding)."""
        positions, patches, layout = self.prompt_inputs(
            input_ids,
            pixel_values,
            image_grid_thw,
            mm_token_type_ids,
            position_ids,
            pixel_values_videos,
            video_grid_thw,
            attention_mask,
            video_advance,
        )
        segment_ids = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return self.forward(jnp.asarray(input_ids), jnp.asarray(positions), segment_ids, patches, layout)

    def prompt_inputs(
        self,
        input_ids,
        pixel_values=None,
        image_grid_thw=None,
        mm_token_type_ids=None,
        position_ids=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        attention_mask=None,
        video_advance: str = "ernie",
        patch_budget: int | None = None,
    ):
        """The host side of the transformers-style call: (positions [B,S,3] numpy, patches, layout)
        (patches and layout None without pixels). `patch_budget` pads the patches (and the layout's
        rows) to that many, so calls with other images reuse one compiled program."""
        v = self.vision_cfg
        ids = np.asarray(input_ids)
        if mm_token_type_ids is None:
            mm_token_type_ids = (ids == v.image_token_id) * 1 + (ids == v.video_token_id) * 2
        grids = [g for g in (image_grid_thw, video_grid_thw) if g is not None]
        pix = [p for p in (pixel_values, pixel_values_videos) if p is not None]
        if position_ids is None:
            positions = build_position_ids(
                mm_token_type_ids,
                image_grid_thw,
                video_grid_thw,
                attention_mask,
                v.spatial_merge,
                v.temporal_merge,
                video_advance,
            )
        else:
            positions = np.moveaxis(np.asarray(position_ids), 0, -1)
        patches = layout = None
        if pix:
            patches = np.concatenate([np.asarray(p, np.float32) for p in pix], axis=0)
            rows = None
            if patch_budget is not None:
                if len(patches) > patch_budget:
                    raise ConfigError(
                        f"the images have {len(patches)} patches, more than patch_budget={patch_budget}; "
                        f"raise it or pass fewer / smaller images"
                    )
                rows = patch_budget // v.spatial_merge**2
                patches = np.pad(patches, ((0, patch_budget - len(patches)), (0, 0)))
            grid = np.concatenate([np.asarray(g).reshape(-1, 3) for g in grids])
            layout = {
                k: jnp.asarray(a)
                for k, a in vision_layout(
                    grid, v.spatial_merge, num_patches=patch_budget, num_rows=rows
                ).items()
            }
            patches = jnp.asarray(patches)
        return positions, patches, layout

    def apply_batch(self, batch: dict) -> ModelOutput:
        """The trainer's call on a prepared batch (vision keys optional)."""
        layout = {
            k: batch[k]
            for k in ("patch_hw", "frame_ids", "pair_first", "pair_second", "row_valid")
            if k in batch
        } or None
        return self.forward(
            batch["input_ids"], batch.get("positions"), batch.get("segment_ids"), batch.get("patches"), layout
        )
