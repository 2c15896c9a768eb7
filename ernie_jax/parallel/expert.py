"""Expert-parallel transports inside `jax.shard_map` (CPU-safe collectives only).

Tokens are split over the batch axes (data x fsdp x expert) and the context shards, experts over
`expert`. Routing is done outside (globally, so router losses see every token); here each device
moves token copies to the devices that own the chosen experts and brings the results back:

- all_to_all: local buffers [E, C, H] (C from the local token count), exchanged so each device gets
  [ep, E_local, C, H] for its experts, computed, exchanged back, combined.
- allgather: gather the tokens of the expert group, compute only the local experts' assignments into
  [E_local, C, H] (C from the group's token count), reduce-scatter the partial outputs.
Assignments beyond capacity are dropped and reported as not kept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ernie_jax.ops.lora import ExpertKernel
from ernie_jax.ops.moe_dispatch import assignment_slots, combine, dispatch, expert_capacity, swiglu_experts
from ernie_jax.precision.fp8 import BoundExperts, ShardedBoundExperts

# the flattened tokens [B*S] split over the batch axes and, minor, the sequence shards (context)
BATCH_AXES = ("data", "fsdp", "expert", "context")


def expert_parallel_experts(x, idx, weights, mask, kernels, cfg, mesh, fp8=None):
    """x [T,H], idx/weights [T,K], mask [T], kernels ([E,H,I],[E,H,I],[E,I,H]) -> (y [T,H], kept [T,K]).
    `fp8`: current/blockwise quantizers, or a delayed-scaling group bound to its amax history, which
    then enters the shard_map as a replicated input (its cotangent carries the amaxes out)."""
    batch = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    tok2, tok1 = P(batch, None), P(batch)
    gate, up, down = (_expert_spec(k, P("expert", None, None)) for k in kernels)
    local = _all_to_all_local if cfg.transport == "all_to_all" else _allgather_local
    fn = functools.partial(
        local,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        factor=cfg.capacity_factor,
        ep=mesh.shape["expert"],
    )
    if isinstance(fp8, BoundExperts):
        axes, devices = tuple(mesh.axis_names), mesh.size

        def with_history(*args):
            *arrays, hist = args
            return fn(*arrays, fp8=ShardedBoundExperts(hist, axes, devices))

        return jax.shard_map(
            with_history,
            mesh=mesh,
            in_specs=(tok2, tok2, tok2, tok1, gate, up, down, P()),
            out_specs=(tok2, tok2),
            check_vma=False,
        )(x, idx, weights, mask, *kernels, fp8.hist)
    return jax.shard_map(
        functools.partial(fn, fp8=fp8),
        mesh=mesh,
        in_specs=(tok2, tok2, tok2, tok1, gate, up, down),
        out_specs=(tok2, tok2),
        check_vma=False,
    )(x, idx, weights, mask, *kernels)


def _expert_spec(kernel, spec: P):
    """The shard_map spec of one kernel: split over experts; a LoRA kernel's A and B likewise, its
    dropout key replicated."""
    if isinstance(kernel, ExpertKernel):
        seed = None if kernel.seed is None else P()
        return kernel.replace(base=spec, a=spec, b=spec, seed=seed)
    return spec


def _all_to_all_local(x, idx, weights, mask, gate, up, down, *, num_experts, top_k, factor, ep, fp8):
    t, h = x.shape
    cap = expert_capacity(t, top_k, num_experts, factor)
    live = jnp.broadcast_to(mask.astype(bool)[:, None], idx.shape)
    expert_km, slot, keep = assignment_slots(idx, live, num_experts, cap)
    buf = dispatch(x, expert_km, slot, num_experts, cap).reshape(ep, num_experts // ep, cap, h)
    buf = jax.lax.all_to_all(buf, "expert", 0, 0)  # [source, E_local, C, H]
    out = swiglu_experts(buf, gate, up, down, fp8=fp8)
    out = jax.lax.all_to_all(out, "expert", 0, 0).reshape(num_experts, cap, h)
    return combine(out, expert_km, slot, keep, weights), keep.reshape(top_k, t).T


def _allgather_local(x, idx, weights, mask, gate, up, down, *, num_experts, top_k, factor, ep, fp8):
    t = x.shape[0]
    gather = functools.partial(jax.lax.all_gather, axis_name="expert", tiled=True)
    xg, idxg, wg, maskg = gather(x), gather(idx), gather(weights), gather(mask)
    e_local = num_experts // ep
    me = jax.lax.axis_index("expert")
    local_idx = idxg - me * e_local
    mine = (local_idx >= 0) & (local_idx < e_local)
    cap = expert_capacity(t * ep, top_k, num_experts, factor)
    live = maskg.astype(bool)[:, None] & mine
    expert_km, slot, keep = assignment_slots(jnp.where(mine, local_idx, 0), live, e_local, cap)
    out = swiglu_experts(dispatch(xg, expert_km, slot, e_local, cap), gate, up, down, fp8=fp8)
    partial = combine(out, expert_km, slot, keep, wg)  # only this device's experts
    y = jax.lax.psum_scatter(partial, "expert", scatter_dimension=0, tiled=True)
    kept = jax.lax.psum(keep.reshape(top_k, -1).T.astype(jnp.int32), "expert") > 0
    return y, jax.lax.dynamic_slice_in_dim(kept, me * t, t, axis=0)
