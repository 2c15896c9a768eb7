"""Per-token cross-entropy, and the LM head + cross-entropy over sequence chunks.

At S = 131072 and V = 103424 one sequence's fp32 logits are 54 GB, so the head runs over chunks
of positions inside a `scan` whose body is rematerialised: the forward pass keeps only each
chunk's per-token losses, the backward pass recomputes one chunk's logits at a time (the idea of
MaxText's vocabulary tiling and ERNIEKit's `loss_subbatch_seqlen`).

Dims: B batch, S sequence, H hidden, V vocabulary, P sequence shards (context parallelism), c chunk.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits [..., V], labels [...] -> per-token CE [...] in fp32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return lse - picked


def chunked_head_cross_entropy(
    head: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    labels: jax.Array,
    chunk: int,
    shards: int = 1,
    constrain: Callable[[jax.Array], jax.Array] = lambda x: x,
) -> jax.Array:
    """CE of `labels` [B,S] under `head(hidden)` ([B,s,H] -> [B,s,V] logits), computed `chunk`
    positions per sequence shard at a time; `shards` > 1 when the sequence is split over devices,
    so every step of the scan works on all shards at once. `constrain` pins a chunk's hidden
    states and logits [B, s, ...] to their devices' tokens: without it the partitioner may keep the
    head's kernel where it lies (split over the hidden dim) and gather every device's tokens
    instead, i.e. compute all P x c positions' logits on each device. Returns [B,S] fp32; equal to
    `token_cross_entropy(head(hidden), labels)` up to float reassociation."""
    b, s, h = hidden.shape
    local = s // shards if s % shards == 0 else s
    shards = s // local
    c = min(chunk, local) if chunk > 0 else local
    logits_of = lambda x: constrain(head(constrain(x)))
    if c >= local:
        return token_cross_entropy(logits_of(hidden), labels)
    n = -(-local // c)
    pad = n * c - local

    def split(a):  # [B, S, ...] -> [n, B, P*c, ...]: step i takes chunk i of every shard
        a = a.reshape(b, shards, local, *a.shape[2:])
        a = jnp.pad(a, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 3))
        a = a.reshape(b, shards, n, c, *a.shape[3:])
        return jnp.moveaxis(a, 2, 0).reshape(n, b, shards * c, *a.shape[4:])

    @jax.checkpoint
    def step(h_c, l_c):
        return token_cross_entropy(logits_of(h_c), l_c)

    def body(carry, xs):
        return carry, step(*xs)

    _, ce = jax.lax.scan(body, None, (split(hidden), split(labels)))  # [n, B, P*c]
    ce = jnp.moveaxis(ce.reshape(n, b, shards, c), 0, 2).reshape(b, shards, n * c)[:, :, :local]
    return ce.reshape(b, s)
