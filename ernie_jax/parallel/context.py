"""Attention under a mesh: a `shard_map` over the batch and head axes (Pallas kernels such as
splash cannot be partitioned automatically), and context parallelism: the sequence split over the
`context` mesh axis.

Load balance (MaxText's dual-chunk reorder, PaddleFormers' `dualchunk_allgather`): the sequence is
cut into 2C chunks and shard r holds chunk r and chunk 2C-1-r, so under a causal mask every shard
has the same work. The model reorders the tokens once at its entry (`load_balanced_order`) and
restores the order of its outputs; every token-wise layer (norms, MLPs, MoE, the head) does not
care about the order, and attention gets each token's original index for its causal mask.

Attention runs inside `shard_map`: queries stay sharded over `context`, keys and values (with their
segment ids and indices) are all-gathered over it (MaxText's default strategy; the backward pass
of the all-gather is a reduce-scatter of dK / dV). `flash` takes the reordered keys as they are;
`splash` gets the keys back in natural order and one causal kernel per chunk with a static offset,
picked by the shard index with `lax.switch`, so the TPU kernel only visits the tiles it needs.

Dims: B batch, S sequence (global), C context shards, N/K heads, D head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ernie_jax.errors import ConfigError
from ernie_jax.ops.attention import AttentionSpec, dot_product_attention, resolve, splash_attention

CONTEXT_AXIS = "context"
_TOKEN_BATCH_AXES = ("data", "fsdp", "expert")


def load_balanced_order(seq_len: int, context: int) -> np.ndarray:
    """perm [S]: position p of the reordered sequence holds original token perm[p]. Shard r (the
    r-th block of S / C positions) holds chunks r and 2C-1-r of 2C equal chunks."""
    if seq_len % (2 * context):
        raise ConfigError(
            f"data.seq_len={seq_len} is not divisible by 2 x mesh.context = {2 * context} "
            f"(each context shard holds two equal chunks); change data.seq_len or mesh.context"
        )
    chunk = seq_len // (2 * context)
    order = []
    for r in range(context):
        for c in (r, 2 * context - 1 - r):
            order.append(np.arange(c * chunk, (c + 1) * chunk))
    return np.concatenate(order).astype(np.int32)


def context_mesh():
    """The mesh set with `jax.set_mesh` when it has a context axis > 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or CONTEXT_AXIS not in mesh.axis_names or mesh.shape[CONTEXT_AXIS] == 1:
        return None
    return mesh


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    token_index: jax.Array | None,
    spec: AttentionSpec,
) -> jax.Array:
    """Self-attention q [B,S,N,D], k/v [B,S,K,D] under the mesh set with `jax.set_mesh` (if any):
    context-parallel when it has a context axis, else each device attends its own rows and heads.
    `token_index` [B,S]: original positions of reordered tokens (None: natural order)."""
    mesh = context_mesh()
    if mesh is not None:
        return context_parallel_attention(q, k, v, segment_ids, token_index, spec, mesh)
    return sharded_attention(q, k, v, segment_ids, token_index, spec)


def sharded_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    token_index: jax.Array | None,
    spec: AttentionSpec,
) -> jax.Array:
    """Self-attention with each device attending its own rows and heads (no sequence split); a
    plain call without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return dot_product_attention(q, k, v, segment_ids, segment_ids, token_index, token_index, spec)
    return _local_attention(q, k, v, segment_ids, token_index, spec, mesh)


def _layout(mesh, q, k):
    """(batch axes, head axis) a shard_map splits attention over: the batch over the token-batch
    axes that divide it, heads over `tensor` when it divides both N and K."""
    t = mesh.shape.get("tensor", 1)
    heads = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
    return _divisible_axes(mesh, [a for a in _TOKEN_BATCH_AXES if a in mesh.axis_names], q.shape[0]), heads


def _local_attention(q, k, v, segment_ids, token_index, spec, mesh):
    batch, heads = _layout(mesh, q, k)
    act, tok = P(batch, None, heads, None), P(batch, None)
    args, specs = [q, k, v], [act, act, act]
    for extra in (segment_ids, token_index):  # optional [B,S] vectors
        if extra is not None:
            args.append(extra)
            specs.append(tok)
    has_seg, has_idx = segment_ids is not None, token_index is not None

    def local(q, k, v, *rest):
        rest = list(rest)
        seg = rest.pop(0) if has_seg else None
        idx = rest.pop(0) if has_idx else None
        return dot_product_attention(q, k, v, seg, seg, idx, idx, spec)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=act, check_vma=False)(*args)


def context_parallel_attention(q, k, v, segment_ids, token_index, spec: AttentionSpec, mesh) -> jax.Array:
    """Queries sharded over `context`, K/V all-gathered over it; tokens in load-balanced order."""
    b, s, n, _ = q.shape
    c = mesh.shape[CONTEXT_AXIS]
    if segment_ids is None:
        segment_ids = jnp.ones((b, s), jnp.int32)
    if token_index is None:
        raise ValueError("context-parallel attention needs the tokens' original indices (token_index)")
    batch, heads = _layout(mesh, q, k)
    act, tok = P(batch, CONTEXT_AXIS, heads, None), P(batch, CONTEXT_AXIS)
    backend, spec = resolve(spec, jax.default_backend(), s)
    local = functools.partial(_splash_local if backend == "splash" else _gathered_local, spec=spec, context=c)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(act, act, act, tok, tok), out_specs=act, check_vma=False
    )(q, k, v, segment_ids.astype(jnp.int32), token_index.astype(jnp.int32))


def _divisible_axes(mesh, axes, size: int):
    chosen = []
    for a in axes:
        if mesh.shape[a] > 1 and size % (math.prod(mesh.shape[x] for x in chosen) * mesh.shape[a]) == 0:
            chosen.append(a)
    return tuple(chosen) or None


def _gather(x):
    return jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)


def _gathered_local(q, k, v, seg, idx, *, spec, context):
    """This shard's queries against all keys, masked by the original indices (any backend that
    takes indices: flash, or dense)."""
    return dot_product_attention(q, _gather(k), _gather(v), seg, _gather(seg), idx, _gather(idx), spec)


def _splash_local(q, k, v, seg, idx, *, spec, context):
    """Splash under context parallelism: keys back in natural order; this shard's two query chunks
    each attend to the keys up to their end with a causal offset, one static kernel per shard."""
    s = k.shape[1] * context
    chunk = s // (2 * context)
    natural = np.argsort(load_balanced_order(s, context))
    k_nat, v_nat, seg_nat = (jnp.take(_gather(x), natural, axis=1) for x in (k, v, seg))

    def shard(r):
        outs = []
        for part, chunk_id in enumerate((r, 2 * context - 1 - r)):
            rows = slice(part * chunk, (part + 1) * chunk)
            end = (chunk_id + 1) * chunk if spec.causal else s
            outs.append(
                splash_attention(
                    q[:, rows],
                    k_nat[:, :end],
                    v_nat[:, :end],
                    seg[:, rows],
                    seg_nat[:, :end],
                    spec,
                    causal_offset=chunk_id * chunk,
                )
            )
        return jnp.concatenate(outs, axis=1)

    return jax.lax.switch(
        jax.lax.axis_index(CONTEXT_AXIS), [functools.partial(shard, r) for r in range(context)]
    )
