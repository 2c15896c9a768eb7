"""MoE dispatch primitives: top-k routing and the two ways to run routed experts on one device's
tokens, shared by the MoE block (model/moe.py) and the expert-parallel transports (parallel/expert.py).

- dropless: sort assignments by expert, grouped matmul with `jax.lax.ragged_dot`, unsort;
- capacity: scatter into fixed buffers [E, C, H], batched einsum, gather back; assignments past
  an expert's capacity are dropped (GShard priority: first choices before second choices).

A kernel is an array [E, K, N] or an `ops.lora.ExpertKernel` (with its low-rank adapter).

Dims: T tokens, H hidden, E experts, K top-k, C capacity, I expert width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ernie_jax.ops.lora import ExpertKernel, buffer_dot, grouped_dot
from ernie_jax.precision.remat import checkpoint_name


def route(logits: jax.Array, bias: jax.Array, top_k: int, norm_min: float):
    """Softmax in fp32; select top-k on p + bias; weights from unbiased p, renormalised.

    Returns probs [T,E], selected expert ids [T,K], combine weights [T,K].
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    _, idx = jax.lax.top_k(probs + bias, top_k)
    weights = jnp.take_along_axis(probs, idx, axis=-1)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), norm_min)
    return probs, idx, weights


def dropless_experts(
    x: jax.Array, idx: jax.Array, weights: jax.Array, kernels, fp8=None, live: jax.Array | None = None
) -> jax.Array:
    """Every live assignment is computed: sort by expert, ragged_dot per expert group, unsort,
    combine. Tokens with live=False (padding, the other modality) sort past the last group, where
    ragged_dot does no work and returns zeros."""
    gate, up, down = kernels
    t, k = idx.shape
    num_experts = gate.shape[0]
    flat_expert = idx.reshape(-1)  # [T*K], token-major
    if live is not None:
        flat_expert = jnp.where(jnp.repeat(live.astype(bool), k), flat_expert, num_experts)
    order = jnp.argsort(flat_expert, stable=True)
    tokens = order // k
    xs = checkpoint_name(jnp.take(x, tokens, axis=0), "moe_dispatch")  # [T*K, H] grouped by expert
    sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
    out = [fp8.out_for(i) if fp8 is not None else (lambda v: v) for i in range(3)]
    h = jax.nn.silu(out[0](grouped_dot(xs, gate, sizes))) * out[1](grouped_dot(xs, up, sizes))
    if fp8 is not None:
        h = fp8.act_for(1)(h)
    ys = checkpoint_name(out[2](grouped_dot(h, down, sizes)), "expert_out")  # [T*K, H]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(t, k, -1)
    return jnp.einsum("tkh,tk->th", y, weights.astype(y.dtype))


def every_expert(
    x: jax.Array, idx: jax.Array, weights: jax.Array, kernels, fp8=None, live: jax.Array | None = None
) -> jax.Array:
    """Dropless for a handful of tokens (a decode step): every expert on every token as one batched
    matmul, the outputs combined with the router weights of the chosen experts (zero elsewhere). The
    same sum as `dropless_experts`, E/K times its FLOPs, without its sort, ragged groups and unsort,
    which cost more than the arithmetic when T is about E or less (tiny MoE decode at batch 8:
    2865 -> 3473 tok/s on CPU)."""
    t, k = idx.shape
    num_experts = kernels[0].shape[0]
    w = weights if live is None else weights * live.astype(weights.dtype)[:, None]
    dense_w = jnp.einsum("tke,tk->te", jax.nn.one_hot(idx, num_experts, dtype=w.dtype), w)
    out = swiglu_experts(jnp.broadcast_to(x, (num_experts, t, x.shape[-1])), *kernels, fp8=fp8)
    return jnp.einsum("eth,te->th", out, dense_w.astype(out.dtype))


def gathered_experts(
    x: jax.Array, idx: jax.Array, weights: jax.Array, kernels, fp8=None, live: jax.Array | None = None
) -> jax.Array:
    """Dropless for tokens whose T*K choices are a small part of the E experts (decode at a small
    batch, e.g. 6 of 64 experts per token in ERNIE-4.5-21B): each assignment's expert is applied to
    its own token, so a step reads T*K experts' weights instead of all E (`every_expert`). Same sum
    as `dropless_experts`. On CPU the assignments go one by one through a scan (a dynamic slice per
    expert is a memcpy; XLA:CPU's gather of whole experts was 3x slower: T=1, E=64, K=6, H=1024,
    I=512: 14.7 ms every expert, 9.7 ms gathered, 2.9 ms one by one); elsewhere one gather and a
    batched matmul."""
    t, k = idx.shape
    xs = jnp.repeat(x, k, axis=0)[:, None]  # [T*K, 1, H]: each assignment its own one-row "expert"
    run = lambda f: functools.partial(f, fp8=fp8)
    out = jax.lax.platform_dependent(
        xs, idx.reshape(-1), kernels, cpu=run(_experts_one_by_one), default=run(_experts_gathered)
    )
    w = weights if live is None else weights * live.astype(weights.dtype)[:, None]
    return jnp.einsum("tkh,tk->th", out.reshape(t, k, -1), w.astype(out.dtype))


def _expert_slices(w, take):
    """`take` applied to a kernel's expert axis (base and adapter of an ExpertKernel)."""
    return w.replace(base=take(w.base), a=take(w.a), b=take(w.b)) if isinstance(w, ExpertKernel) else take(w)


def _experts_gathered(xs, experts, kernels, fp8):
    return swiglu_experts(xs, *(_expert_slices(w, lambda a: a[experts]) for w in kernels), fp8=fp8)


def _experts_one_by_one(xs, experts, kernels, fp8):
    def one(_, assignment):
        x1, e = assignment  # [1, H], its expert
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, e, 1, axis=0)
        return None, swiglu_experts(x1[None], *(_expert_slices(w, take) for w in kernels), fp8=fp8)[0]

    return jax.lax.scan(one, None, (xs, experts))[1]


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    return max(1, min(num_tokens, math.ceil(factor * num_tokens * top_k / num_experts)))


def assignment_slots(idx: jax.Array, live: jax.Array, num_experts: int, capacity: int):
    """Slot of every assignment inside its expert buffer, first choices of all tokens before second
    choices (GShard priority). idx [T,K], live [T,K] bool (False: takes no slot).
    Returns choice-major (expert [K*T], slot [K*T] with `capacity` meaning dropped, keep [K*T])."""
    t, k = idx.shape
    expert_km = idx.T.reshape(-1)
    live_km = live.T.reshape(-1)
    onehot = jax.nn.one_hot(expert_km, num_experts, dtype=jnp.int32) * live_km[:, None]
    slot = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    keep = live_km & (slot < capacity) & (expert_km >= 0) & (expert_km < num_experts)
    return expert_km, jnp.where(keep, slot, capacity), keep


def dispatch(x: jax.Array, expert_km, slot, num_experts: int, capacity: int) -> jax.Array:
    """Tokens [T,H] -> expert buffers [E,C,H]; dropped assignments (slot == C) write nothing."""
    t = x.shape[0]
    token = jnp.tile(jnp.arange(t), expert_km.shape[0] // t)
    buf = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
    return checkpoint_name(
        buf.at[expert_km, slot].set(jnp.take(x, token, axis=0), mode="drop"), "moe_dispatch"
    )


def swiglu_experts(buf: jax.Array, gate, up, down, fp8=None) -> jax.Array:
    """[..., E, C, H] through expert e's SwiGLU for every buffer row of expert e. With `fp8`, the
    inputs arrive quantized; the hidden activation is quantized here and output gradients go e5m2."""
    out = [fp8.out_for(i) if fp8 is not None else (lambda v: v) for i in range(3)]
    h = jax.nn.silu(out[0](buffer_dot(buf, gate))) * out[1](buffer_dot(buf, up))
    if fp8 is not None:
        h = fp8.act_for(1)(h)
    return checkpoint_name(out[2](buffer_dot(h, down)), "expert_out")


def combine(out: jax.Array, expert_km, slot, keep, weights: jax.Array) -> jax.Array:
    """Expert buffers [E,C,H] -> tokens [T,H], weighted by the router weights of kept assignments."""
    t, k = weights.shape
    ys = out.at[expert_km, slot].get(mode="fill", fill_value=0).reshape(k, t, -1).transpose(1, 0, 2)
    return jnp.einsum("tkh,tk->th", ys, (weights * keep.reshape(k, t).T).astype(ys.dtype))


def capacity_experts(
    x: jax.Array, idx: jax.Array, weights: jax.Array, mask: jax.Array, kernels, capacity: int, fp8=None
):
    """Fixed buffers [E, C, H] on one device; padding tokens take no slot. Returns (y [T,H], kept [T,K])."""
    num_experts = kernels[0].shape[0]
    live = jnp.broadcast_to(mask.astype(bool)[:, None], idx.shape)
    expert_km, slot, keep = assignment_slots(idx, live, num_experts, capacity)
    out = swiglu_experts(dispatch(x, expert_km, slot, num_experts, capacity), *kernels, fp8=fp8)
    return combine(out, expert_km, slot, keep, weights), keep.reshape(idx.shape[1], -1).T


def split_groups(a: jax.Array, b: int, s: int, rows: int, seqs: int) -> jax.Array:
    """Token-major [B*S, ...] -> [rows*seqs, B/rows * S/seqs, ...]: group g holds the tokens of
    one device (a block of rows and a block of the sequence)."""
    rest = a.shape[1:]
    a = jnp.moveaxis(a.reshape(rows, b // rows, seqs, s // seqs, *rest), 2, 1)
    return a.reshape(rows * seqs, -1, *rest)


def merge_groups(a: jax.Array, b: int, s: int, rows: int, seqs: int) -> jax.Array:
    """The inverse of `split_groups`."""
    rest = a.shape[2:]
    a = jnp.moveaxis(a.reshape(rows, seqs, b // rows, s // seqs, *rest), 1, 2)
    return a.reshape(b * s, *rest)
