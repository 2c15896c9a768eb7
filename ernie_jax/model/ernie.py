"""The ERNIE 4.5 decoder: pre-norm blocks (model/blocks.py), stacked and scanned, with optional MoE
and MTP.

Layer layout. ERNIE places MoE at layer i iff (i+1) % interval == 0 and start <= i <= end, so the
decoder is: a `prefix` stack of dense layers, a stack of `units` (interval-1 dense layers then one
MoE layer, repeated), and a `suffix` stack of dense layers. Each stack is one scan, so compile time
does not grow with depth. `config.layer_plan` maps global layer indices onto this layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from ernie_jax.config import (  # noqa: F401 - layer_plan re-exported
    Config,
    LayerPlan,
    ModelConfig,
    MoEConfig,
    PrecisionConfig,
    VisionConfig,
    layer_plan,
    pipelined_stack,
)
from ernie_jax.model.blocks import (
    BlockContext,
    DecoderLayer,
    MoEUnit,
    MTPLayer,
    scan_extend,
    scan_layers,
    stack_layers,
    unstack,
)
from ernie_jax.model.kv_cache import KVCache
from ernie_jax.model.layers import Embed, Linear, RMSNorm
from ernie_jax.model.rope import rope_angles, rope_angles_3d
from ernie_jax.ops import router_stats
from ernie_jax.ops.cross_entropy import chunked_head_cross_entropy
from ernie_jax.parallel.context import load_balanced_order
from ernie_jax.parallel.layout import ModelLayout
from ernie_jax.parallel.mesh import constrain_batch
from ernie_jax.parallel.pipeline import pipeline_apply


@struct.dataclass
class ModelOutput:
    """logits [B,S,V] (None when the call had labels); router_losses: named scalars summed over MoE
    layers; expert_load [L_moe,E]; mtp_logits [D,B,S,V] or None; hidden [B,S,H] (last hidden state
    before the final norm). With labels, the head runs in chunks and only per-token losses come
    back: label_nll [B,S] (-log p(labels[t])) and mtp_label_nll [D,B,S] (depth d scores labels[t+d+1])."""

    logits: Any
    router_losses: dict
    expert_load: Any = None
    dropped_fraction: Any = None
    mtp_logits: Any = None
    hidden: Any = None
    vision_expert_load: Any = None  # [L_moe, E_vision] for heterogeneous (VL) layers
    label_nll: Any = None
    mtp_label_nll: Any = None

    def loads(self) -> dict:
        """Tokens per expert [L_moe, E] by router ("gate", "vision_gate"): what the post-step
        correction-bias rule balances."""
        out = {"gate": self.expert_load, "vision_gate": self.vision_expert_load}
        return {k: v for k, v in out.items() if v is not None}


@struct.dataclass
class Prepared:
    """What the layers after the decoder stacks need besides the hidden states: the blocks' context
    and the labels (all [B,S,...], MTP ones [D,B,S]; None without labels / MTP)."""

    ctx: BlockContext
    labels: jax.Array | None = None
    mtp_ids: jax.Array | None = None
    mtp_labels: jax.Array | None = None


class ErnieForCausalLM(nnx.Module):
    """ERNIE 4.5 text model (dense or MoE). Call with input_ids [B,S] -> ModelOutput.

    Built from the model and MoE configs, the precision settings and the mesh layout
    (`parallel.layout.model_layout(cfg)`: pipeline schedule, context shards, expert parallelism);
    `build_model(cfg, rngs)` does this for a whole Config. `vision` only sets the temporal RoPE
    frequencies of 3D positions (the VL model)."""

    def __init__(
        self,
        model: ModelConfig,
        moe: MoEConfig = MoEConfig(),
        precision: PrecisionConfig = PrecisionConfig(),
        layout: ModelLayout = ModelLayout(),
        *,
        rngs: nnx.Rngs,
        vision: VisionConfig = VisionConfig(),
    ):
        m = model
        self.model_cfg, self.moe_cfg, self.vision_cfg, self.layout = model, moe, vision, layout
        self.plan = plan = LayerPlan.of(model, moe)
        dt, pd = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        self.embed_tokens = Embed(
            m.vocab_size, m.hidden_size, rngs=rngs, std=m.init_std, dtype=dt, param_dtype=pd
        )
        dense = lambda r: DecoderLayer(m, None, precision, rngs=r)
        self.prefix = stack_layers(plan.num_prefix, dense, rngs) if plan.num_prefix else None
        unit = lambda r: MoEUnit(
            m,
            moe,
            precision,
            plan.dense_per_unit,
            rngs=r,
            in_stage=layout.schedule is not None,
            expert_parallel=layout.expert_parallel,
        )
        self.units = stack_layers(plan.num_units, unit, rngs) if plan.num_units else None
        self.suffix = stack_layers(plan.num_suffix, dense, rngs) if plan.num_suffix else None
        self.norm = RMSNorm(m.hidden_size, m.rms_norm_eps, param_dtype=pd)
        self.lm_head = (
            None
            if m.tie_word_embeddings
            else Linear(
                m.hidden_size,
                m.vocab_size,
                axes=("embed", "vocab"),
                rngs=rngs,
                std=m.init_std,
                dtype=dt,
                param_dtype=pd,
            )
        )
        self.mtp = (
            stack_layers(m.mtp_depth, lambda r: MTPLayer(m, precision, rngs=r), rngs) if m.mtp_depth else None
        )

    def architecture(self) -> Config:
        """The model's part of a Config (model, MoE and vision settings): what export writes."""
        return Config(model=self.model_cfg, moe=self.moe_cfg, vision=self.vision_cfg)

    def head(self, h: jax.Array, tied_table_t: jax.Array | None = None) -> jax.Array:
        """Final norm and LM head; tied_table_t: `head_table_t()`, for a decode loop to lay the tied
        embedding out once."""
        h = self.norm(h)
        return self.embed_tokens.attend(h, tied_table_t) if self.lm_head is None else self.lm_head(h)

    def head_table_t(self) -> jax.Array | None:
        """The tied embedding as [H, V] (None when the LM head is its own Linear)."""
        return self.embed_tokens.transposed() if self.lm_head is None else None

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        modality: jax.Array | None = None,
        labels: jax.Array | None = None,
    ) -> ModelOutput:
        """input_ids [B,S]; positions [B,S] (default arange) or [B,S,3] (t, h, w: 3D RoPE);
        segment_ids [B,S] (0 = padding, equal ids attend to each other; default one segment);
        inputs_embeds replaces the lookup; modality [B,S] routes 1 = vision tokens to the vision
        experts of heterogeneous MoE layers (default: all text); labels [B,S]: return per-token
        losses from a chunked head instead of logits (the training path)."""
        x, prep = self.prepare(input_ids, positions, segment_ids, inputs_embeds, modality, labels)
        pipelined = pipelined_stack(self.units is not None)
        stats = None
        for name in ("prefix", "units", "suffix"):
            stack = getattr(self, name)
            if stack is None:
                continue
            x, stack_stats = self._run_stack(stack, x, prep.ctx, pipelined=name == pipelined)
            if name == "units":
                stats = stack_stats
        return self.finish(x, prep, stats)

    def prepare(
        self, input_ids, positions=None, segment_ids=None, inputs_embeds=None, modality=None, labels=None
    ):
        """The inputs of the decoder stacks: (token embeddings [B,S,H], `Prepared`: the blocks'
        context and the labels), in the load-balanced token order under context parallelism."""
        m = self.model_cfg
        b, s = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        token_mask = jnp.ones((b, s), bool) if segment_ids is None else segment_ids > 0
        if modality is None:
            modality = jnp.zeros((b, s), jnp.int32)
        mtp_ids = self._mtp_input_ids(input_ids) if self.mtp is not None else None
        mtp_labels = (
            _shifted_labels(labels, m.mtp_depth) if self.mtp is not None and labels is not None else None
        )
        order = self._token_order(s)
        token_index = None
        if order is not None:  # context parallelism: load-balanced token order, undone on the outputs
            take = lambda a, axis=1: None if a is None else jnp.take(a, order, axis=axis)
            input_ids, positions, segment_ids, token_mask, modality, inputs_embeds, labels = (
                take(a)
                for a in (input_ids, positions, segment_ids, token_mask, modality, inputs_embeds, labels)
            )
            mtp_ids, mtp_labels = take(mtp_ids, 2), take(mtp_labels, 2)
            token_index = jnp.broadcast_to(jnp.asarray(order), (b, s))
        ctx = BlockContext(
            angles=self._angles(positions),
            token_mask=token_mask,
            modality=modality,
            segment_ids=segment_ids,
            token_index=token_index,
        )
        x = self._input_embeddings(input_ids, inputs_embeds)
        return x, Prepared(ctx, labels, mtp_ids, mtp_labels)

    def finish(self, x, prep: Prepared, stats) -> ModelOutput:
        """The last hidden states x [B,S,H] (after every stack) and the MoE units' router statistics
        -> the outputs: MTP, the head (logits, or per-token losses of the labels), router summaries."""
        mtp_hidden = self._mtp(x, prep.mtp_ids, prep.ctx) if self.mtp is not None else None
        out = self._heads(x, mtp_hidden, prep.labels, prep.mtp_labels)
        order = self._token_order(x.shape[1])
        if order is not None:
            restore = np.argsort(order)
            out = {
                k: None if v is None else jnp.take(v, restore, axis=2 if k.startswith("mtp") else 1)
                for k, v in out.items()
            }
        losses, load, vision_load, dropped = router_stats.summarise(stats)
        return ModelOutput(
            router_losses=losses,
            expert_load=load,
            dropped_fraction=dropped,
            vision_expert_load=vision_load,
            **out,
        )

    def _token_order(self, s: int) -> np.ndarray | None:
        """The load-balanced token order under context parallelism (static), else None."""
        shards = self.layout.context_shards
        return load_balanced_order(s, shards) if shards > 1 else None

    def _heads(self, x, mtp_hidden, labels, mtp_labels) -> dict:
        """Logits, or (with labels) per-token losses from the chunked head; MTP likewise."""
        m, shards = self.model_cfg, self.layout.context_shards
        if labels is None:
            return {
                "logits": self.head(x),
                "hidden": x,
                "label_nll": None,
                "mtp_label_nll": None,
                "mtp_logits": None if mtp_hidden is None else self.head(mtp_hidden),
            }
        nll = lambda h, lab: chunked_head_cross_entropy(
            self.head, h, lab, m.logits_chunk, shards, constrain_batch
        )
        mtp = (
            None
            if mtp_hidden is None
            else jnp.stack([nll(mtp_hidden[d], mtp_labels[d]) for d in range(m.mtp_depth)])
        )
        return {
            "logits": None,
            "hidden": x,
            "label_nll": nll(x, labels),
            "mtp_label_nll": mtp,
            "mtp_logits": None,
        }

    def run_stack(self, name: str, x, ctx):
        """x through the stack `name` (prefix / units / suffix) as one scan (no pipeline schedule)."""
        return scan_layers(getattr(self, name), x, ctx, self.model_cfg)

    def stage_chunk(self, chunk, x, ctx, active=None):
        """One pipeline stage's chunk of the pipelined stack (a stacked module) over x."""
        return scan_layers(chunk, x, ctx, self.model_cfg, True, active)

    def _run_stack(self, stack, x, ctx, pipelined: bool):
        """One scan over a stack, or the pipeline schedule for the pipelined stack when mesh.pipeline > 1."""
        m = self.model_cfg
        sched = self.layout.schedule if pipelined else None
        if sched is None:
            return scan_layers(stack, x, ctx, m)
        return pipeline_apply(
            stack,
            x,
            ctx,
            lambda chunk, x_mb, ctx_mb, active: scan_layers(chunk, x_mb, ctx_mb, m, True, active),
            sched,
        )

    # ------------------------------------------------------------------ generation (KV cache)

    def init_cache(self, batch: int, length: int, dtype=None) -> dict:
        """Zeroed KV caches for `batch` rows of up to `length` positions, one per stack, shaped like
        the stacks (kv heads only)."""
        m, plan = self.model_cfg, self.plan
        dtype = jnp.dtype(m.dtype) if dtype is None else dtype
        kv = lambda *lead: KVCache.zeros(lead, batch, length, m.num_kv_heads, m.head_dim, dtype)
        cache = {}
        if plan.num_prefix:
            cache["prefix"] = kv(plan.num_prefix)
        if plan.num_units:
            cache["units"] = {"moe": kv(plan.num_units)}
            if plan.dense_per_unit:
                cache["units"]["dense"] = kv(plan.num_units, plan.dense_per_unit)
        if plan.num_suffix:
            cache["suffix"] = kv(plan.num_suffix)
        return cache

    def decoder_layers(self) -> list:
        """Every decoder layer in order as its own module (`unstack`): the per-layer decode loop runs
        these with `layer_caches`, so a layer's weights and cache are whole buffers."""
        layers = unstack(self.prefix) if self.prefix is not None else []
        for unit in unstack(self.units) if self.units is not None else []:
            layers += (unstack(unit.dense) if unit.dense is not None else []) + [unit.moe]
        return layers + (unstack(self.suffix) if self.suffix is not None else [])

    def layer_caches(self, cache: dict) -> list[KVCache]:
        """The stacks' caches (`init_cache`, e.g. after a scanned prefill) split into one per layer,
        in `decoder_layers` order."""
        out = cache["prefix"].per_layer() if "prefix" in cache else []
        if "units" in cache:
            dense = cache["units"]["dense"].per_layer() if "dense" in cache["units"] else []
            d = self.plan.dense_per_unit
            for u, moe in enumerate(cache["units"]["moe"].per_layer()):
                out += dense[u * d : (u + 1) * d] + [moe]
        return out + (cache["suffix"].per_layer() if "suffix" in cache else [])

    def extend(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        cache: dict,
        slot: jax.Array,
        first_slot: jax.Array,
        *,
        prefill: bool,
        segment_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        modality: jax.Array | None = None,
        layers: list | None = None,
    ) -> tuple[jax.Array, dict | list]:
        """Run new tokens input_ids [B,S] at `positions` ([B,S] or [B,S,3]) through the decoder,
        storing their keys and values in cache slots slot .. slot + S - 1 -> (hidden [B,S,H], what
        `head` takes; cache). Prompts are left-padded: row b's real tokens start at first_slot[b].
        `prefill`: the prompts from slot 0, segment_ids marking padding 0; else decode steps
        attending over the cache. MoE layers route every token (build the model with dropless
        dispatch: capacity would drop). `layers`: `decoder_layers()`, run one by one with `cache` a
        list from `layer_caches` (else the stacks are scanned over the `init_cache` dict)."""
        b, s = input_ids.shape
        token_mask = jnp.ones((b, s), bool) if segment_ids is None else segment_ids > 0
        if modality is None:
            modality = jnp.zeros((b, s), jnp.int32)
        ctx = BlockContext(
            angles=self._angles(positions), token_mask=token_mask, modality=modality, segment_ids=segment_ids
        )
        x = self._input_embeddings(input_ids, inputs_embeds)
        if layers is not None:
            out = []
            for layer, layer_cache in zip(layers, cache, strict=True):
                x, layer_cache = layer.extend(x, ctx, layer_cache, (slot, first_slot), prefill)
                out.append(layer_cache)
            return x, out
        out = {}
        for name in ("prefix", "units", "suffix"):
            stack = getattr(self, name)
            if stack is not None:
                x, out[name] = scan_extend(stack, x, ctx, cache[name], (slot, first_slot), prefill)
        return x, out

    def _input_embeddings(self, input_ids, inputs_embeds):
        """The token embeddings, or the given ones (VL: text and vision merged) in the compute dtype."""
        if inputs_embeds is None:
            return self.embed_tokens(input_ids)
        return inputs_embeds.astype(jnp.dtype(self.model_cfg.dtype))

    def _angles(self, positions):
        m = self.model_cfg
        if positions.ndim == 3:
            return rope_angles_3d(positions, m.head_dim, m.rope_theta, self.vision_cfg.rope_t_frequencies)
        return rope_angles(positions, m.head_dim, m.rope_theta)

    def apply_batch(self, batch: dict) -> ModelOutput:
        """The trainer's call on a prepared batch (per-token losses of its labels)."""
        return self(
            batch["input_ids"],
            positions=batch.get("positions"),
            segment_ids=batch.get("segment_ids"),
            labels=batch.get("labels"),
        )

    def _mtp_input_ids(self, input_ids):
        """[D,B,S]: depth d reads the embedding of token t+d+1 (shifted left, padded)."""
        depth, pad, s = self.model_cfg.mtp_depth, self.model_cfg.pad_token_id, input_ids.shape[1]
        padded = jnp.pad(input_ids, ((0, 0), (0, depth)), constant_values=pad)
        return jnp.stack([padded[:, d + 1 : d + 1 + s] for d in range(depth)])

    def _mtp(self, h, mtp_ids, ctx):
        """Depth d predicts token t+d+2 from h_t and the embedding of token t+d+1; [D,B,S,H]."""
        embs = self.embed_tokens(mtp_ids)

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, None), out_axes=(nnx.Carry, 0))
        def body(h, layer, emb, ctx):
            # pinned to their devices' tokens like the main stack's blocks (under context
            # parallelism the partitioner otherwise gathered the whole sequence for the MTP block)
            out = constrain_batch(layer(constrain_batch(h), constrain_batch(emb), ctx))
            return out, out

        _, hidden = body(h, self.mtp, embs, ctx)  # the head stays out of the scan
        return hidden


def _shifted_labels(labels, depth: int):
    """[D,B,S]: MTP depth d at position t is scored on labels[t+d+1] (0 past the end; the
    objective masks those positions)."""
    s = labels.shape[1]
    padded = jnp.pad(labels, ((0, 0), (0, depth)))
    return jnp.stack([padded[:, d + 1 : d + 1 + s] for d in range(depth)])


def router_loss_total(output: ModelOutput, e: MoEConfig) -> jax.Array:
    """lambda_aux * L_aux + lambda_z * L_z + lambda_orth * L_orth (orth only in `loss` mode)."""
    orth = e.orth_loss_weight if e.orth_mode == "loss" else None
    return router_stats.weighted_total(output.router_losses, e.aux_loss_weight, e.z_loss_weight, orth)
