"""The MoE block: fp32 softmax router with an aux-free correction bias, routed experts as batched
tensors [E, ...], optional shared experts, and two dispatch implementations behind one call:

- dropless: sort assignments by expert, grouped matmul with `jax.lax.ragged_dot`, unsort;
- capacity: scatter into fixed buffers [E, C, H], batched einsum, gather back; assignments past
  an expert's capacity are dropped (their token still gets the shared experts).

Dims: T tokens, H hidden, E experts, K top-k, C capacity, I expert width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ernie_jax.model import router_losses
from ernie_jax.model.layers import DotGeneral, SwiGLU, normal_init
from ernie_jax.ops import matmul
from ernie_jax.ops.lora import ExpertKernel
from ernie_jax.ops.router_stats import GroupStats
from ernie_jax.ops.moe_dispatch import (
    capacity_experts,
    dropless_experts,
    every_expert,
    expert_capacity,
    gathered_experts,
    merge_groups,
    route,
    split_groups,
)
from ernie_jax.parallel.expert import expert_parallel_experts
from ernie_jax.parallel.mesh import constrain_groups, token_groups
from ernie_jax.precision.fp8 import DelayedFp8, Fp8Meta


class CorrectionBias(nnx.Variable):
    """Aux-loss-free routing bias: non-trainable, updated by a pure rule after each step."""


class Router(nnx.Module):
    """logits = x.f32 @ W [H, E]; kept in fp32 regardless of the compute dtype."""

    def __init__(self, hidden: int, num_experts: int, *, rngs: nnx.Rngs, std: float):
        self.kernel = nnx.Param(
            normal_init(std)(rngs.params(), (hidden, num_experts), jnp.float32), axes=("embed", "exp")
        )
        self.correction_bias = CorrectionBias(jnp.zeros((num_experts,), jnp.float32), axes=("exp",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(jnp.float32), self.kernel[...], precision=jax.lax.Precision.HIGHEST)


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Experts(nnx.Module):
    """E SwiGLU experts stored as stacked kernels gate/up [E,H,I] and down [E,I,H]."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        inter: int,
        *,
        rngs: nnx.Rngs,
        std: float,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        init = normal_init(std)
        self.dtype = dtype
        self.gate_proj = nnx.Param(
            init(rngs.params(), (num_experts, hidden, inter), param_dtype), axes=("exp", "embed", "mlp")
        )
        self.up_proj = nnx.Param(
            init(rngs.params(), (num_experts, hidden, inter), param_dtype), axes=("exp", "embed", "mlp")
        )
        self.down_proj = nnx.Param(
            init(rngs.params(), (num_experts, inter, hidden), param_dtype), axes=("exp", "mlp", "embed")
        )

        # a projection's LoraAdapter, once model/lora.py attaches one
        self.gate_proj_lora = self.up_proj_lora = self.down_proj_lora = None

    def kernels(self):
        """(gate, up, down) in the compute dtype; an `ExpertKernel` where a projection has an adapter."""
        out = []
        for name in PROJECTIONS:
            w = getattr(self, name)[...].astype(self.dtype)
            adapter = getattr(self, name + "_lora")
            out.append(w if adapter is None else adapter.expert_kernel(w, self.dtype))
        return tuple(out)


def expert_parallel_mesh():
    """The mesh set with `jax.set_mesh` when it has an expert axis > 1, else None (a call outside
    the training mesh, e.g. a conversion check on one device, computes the same experts locally)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
        return None
    return mesh


def local_experts(x, idx, weights, live, kernels, cfg, fp8=None):
    """Routed experts over one device's tokens x [T,H] (dropless, or capacity from T) -> (y, kept [T,K])."""
    if cfg.dispatch == "dropless":
        return dropless_for(x.shape[0], idx.shape[1], kernels[0].shape[0])(
            x, idx, weights, kernels, fp8, live=live
        ), jnp.ones_like(idx, bool)
    cap = expert_capacity(x.shape[0], cfg.top_k, cfg.num_experts, cfg.capacity_factor)
    return capacity_experts(x, idx, weights, live, kernels, cap, fp8)


def dropless_for(tokens: int, top_k: int, num_experts: int):
    """The dropless path for a (static) token count. Decode steps are memory-bound: with T*K at most
    half of E, gathering each choice's expert reads the fewest weights (`gathered_experts`); up to E
    tokens, every expert once, densely (cheaper than sorting into groups); beyond, ragged groups."""
    if 2 * tokens * top_k <= num_experts:
        return gathered_experts
    return every_expert if tokens <= num_experts else dropless_experts


def per_device_experts(x, idx, weights, live, kernels, cfg, fp8, shape):
    """`local_experts` once per device's tokens (`token_groups`), so every dispatch buffer stays on
    its device. Over all tokens at once, the slot counts and the [E, C, H] buffers (C from the global
    token count) were replicated on every device: 8-way data parallel took 1.7x (capacity) and 5.8x
    (dropless) the step temp memory of one device (scripts/bench_memory.py --shards 8). Capacity is
    per device, as in GShard's groups and the expert-parallel transports.

    Capacity dispatch is vmapped over the groups (the partitioner places one per device). Dropless
    runs in a `shard_map` over them: a vmapped `ragged_dot` is a batched ragged dot, which the TPU
    compiler does not take (`Failed to create RaggedConvSpec ... number of batch dimensions should
    be 0`); inside the shard_map each device's ragged dot is unbatched."""
    b, s = shape
    # under an expert axis (moe.transport=auto) the groups leave it to the experts' dim
    rows, seqs, axes = token_groups(b, s, skip=("pipeline", "expert"))
    if rows * seqs == 1:
        return local_experts(x, idx, weights, live, kernels, cfg, fp8)
    split = lambda a: constrain_groups(split_groups(a, b, s, rows, seqs), axes)
    tokens = (split(x), split(idx), split(weights), split(live))
    if cfg.dispatch == "dropless":
        group = P(axes)

        def one_device(x, i, w, lv, *k):
            y, kept = local_experts(x[0], i[0], w[0], lv[0], k, cfg, fp8)
            return y[None], kept[None]

        y, kept = jax.shard_map(
            one_device,
            mesh=jax.sharding.get_abstract_mesh(),
            in_specs=(group,) * 4 + (P(),) * len(kernels),
            out_specs=(group, group),
            check_vma=False,
        )(*tokens, *kernels)
    else:
        y, kept = jax.vmap(
            lambda x, i, w, lv: local_experts(x, i, w, lv, kernels, cfg, fp8), in_axes=(0, 0, 0, 0)
        )(*tokens)
    return merge_groups(y, b, s, rows, seqs), merge_groups(kept, b, s, rows, seqs)


class MoEBlock(nnx.Module):
    """Routed experts + shared experts; returns the output and a dict of named router statistics.

    With `moe.vision_num_experts` the block is ERNIE-VL's heterogeneous layer: a second router and
    expert group for vision tokens. Routing is modality-isolated: a text token can only reach text
    experts and a vision token only vision experts, each with its own softmax, top-k and correction
    bias; each group computes only its own tokens (the other modality is masked out of its
    dispatch exactly like padding). Shared experts see every token.
    """

    def __init__(
        self,
        hidden: int,
        moe_cfg,
        *,
        rngs: nnx.Rngs,
        std: float,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        dot_general: DotGeneral = matmul.dot_general,
        fp8=None,
        expert_parallel: bool = False,
    ):
        self.cfg = moe_cfg
        # the expert-parallel transports of moe.transport (the model's layout: mesh.expert > 1)
        self.expert_parallel = expert_parallel and moe_cfg.transport != "auto"
        self.fp8 = fp8  # quantizers for the routed-expert matmuls, or None
        self.gate = Router(hidden, moe_cfg.num_experts, rngs=rngs, std=std)
        self.experts = Experts(
            moe_cfg.num_experts,
            hidden,
            moe_cfg.intermediate_size,
            rngs=rngs,
            std=std,
            dtype=dtype,
            param_dtype=param_dtype,
        )
        if moe_cfg.vision_num_experts:
            self.vision_gate = Router(hidden, moe_cfg.vision_num_experts, rngs=rngs, std=std)
            self.vision_experts = Experts(
                moe_cfg.vision_num_experts,
                hidden,
                moe_cfg.vision_intermediate_size,
                rngs=rngs,
                std=std,
                dtype=dtype,
                param_dtype=param_dtype,
            )
        else:
            self.vision_gate = self.vision_experts = None
        delayed = isinstance(fp8, DelayedFp8)

        def meta():
            return Fp8Meta(
                jnp.zeros((DelayedFp8.EXPERT_ROWS, fp8.history), jnp.float32), axes=("norm", "norm")
            )

        self.fp8_meta = meta() if delayed else None
        self.vision_fp8_meta = meta() if delayed and moe_cfg.vision_num_experts else None
        shared_width = moe_cfg.intermediate_size * moe_cfg.num_shared_experts
        self.shared_experts = (
            SwiGLU(
                hidden,
                shared_width,
                rngs=rngs,
                std=std,
                dtype=dtype,
                param_dtype=param_dtype,
                dot_general=dot_general,
            )
            if shared_width
            else None
        )
        self.dtype = dtype

    def groups(self):
        """(group name, router, experts, group config) for each expert group, text first."""
        cfg = self.cfg
        out = [("text", self.gate, self.experts, cfg)]
        if self.vision_gate is not None:
            vcfg = dataclasses.replace(
                cfg,
                num_experts=cfg.vision_num_experts,
                top_k=cfg.vision_top_k or cfg.top_k,
                intermediate_size=cfg.vision_intermediate_size,
                capacity_factor=cfg.vision_capacity_factor or cfg.capacity_factor,
                group_orthogonal=False,
            )  # ERNIE never groups the vision router
            out.append(("vision", self.vision_gate, self.vision_experts, vcfg))
        return out

    def __call__(self, x: jax.Array, token_mask: jax.Array, modality: jax.Array | None = None):
        """x [B,S,H], token_mask [B,S] (1 = real token), modality [B,S] (0 text, 1 vision; None =
        all text) -> (y [B,S,H], {group: GroupStats})."""
        b, s, hdim = x.shape
        xt = x.reshape(b * s, hdim).astype(self.dtype)
        mask = token_mask.reshape(b * s).astype(bool)
        vision = jnp.zeros_like(mask) if modality is None else modality.reshape(b * s) > 0
        y, stats = jnp.zeros_like(xt), {}
        for group, gate, experts, gcfg in self.groups():  # at most two groups, fixed at build time
            live = mask & (vision if group == "vision" else ~vision)
            fp8 = self._quantizers(group)
            xq = fp8.act_for(0)(xt) if fp8 is not None else xt
            y_g, stats[group] = self._group(xt, xq, live, gate, experts, gcfg, fp8, (b, s))
            y = y + y_g
        if self.shared_experts is not None:
            y = y + self.shared_experts(xt)
        return y.reshape(b, s, hdim).astype(x.dtype), stats

    def _quantizers(self, group: str):
        """The group's FP8 quantizers (bound to its amax history under delayed scaling) or None."""
        if self.fp8 is None or self.fp8_meta is None:
            return self.fp8
        meta = self.vision_fp8_meta if group == "vision" else self.fp8_meta
        return self.fp8.bind(meta[...])

    def _group(self, xt, xq, live, gate, experts, cfg, fp8, shape):
        """One expert group over the tokens where `live` is True; `shape` (B, S) of the tokens."""
        logits = gate(xt)
        probs, idx, weights = route(logits, gate.correction_bias[...], cfg.top_k, cfg.norm_min)
        kernels = experts.kernels()
        if fp8 is not None:  # the base is quantized; an adapter stays in the compute dtype
            kernels = tuple(
                k.with_base(fp8.weight_for(i)(k.base))
                if isinstance(k, ExpertKernel)
                else fp8.weight_for(i)(k)
                for i, k in enumerate(kernels)
            )
        ep_mesh = expert_parallel_mesh() if self.expert_parallel else None
        if ep_mesh is not None:
            y, kept = expert_parallel_experts(xq, idx, weights, live, kernels, cfg, ep_mesh, fp8)
        else:
            y, kept = per_device_experts(xq, idx, weights, live, kernels, cfg, fp8, shape)
        return y, self._stats(cfg, gate, logits, probs, idx, kept, live)

    @staticmethod
    def _stats(cfg, gate, logits, probs, idx, kept, mask):
        maskf = mask.astype(jnp.float32)
        _, unbiased_idx = jax.lax.top_k(probs, cfg.top_k)
        groups = cfg.top_k if cfg.group_orthogonal and cfg.num_experts % cfg.top_k == 0 else 1
        load = (jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32) * maskf[:, None, None]).sum((0, 1))
        dropped = jnp.sum((~kept) * maskf[:, None])
        return GroupStats(
            aux_loss=router_losses.aux_balance_loss(probs, unbiased_idx, mask),
            z_loss=router_losses.z_loss(logits, mask),
            orth_loss=router_losses.orthogonal_loss(gate.kernel[...], groups),
            expert_load=jax.lax.stop_gradient(load),
            dropped=jax.lax.stop_gradient(dropped),
            assignments=jnp.sum(maskf) * cfg.top_k,
        )
