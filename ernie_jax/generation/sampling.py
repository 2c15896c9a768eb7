"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def truncated_logits(logits: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array) -> jax.Array:
    """logits [B,V] fp32 scaled by 1/temperature with everything outside the top-k and outside the
    smallest set whose probability reaches top_p set to -inf (Holtzman et al. 2019). The most
    likely token always stays."""
    scaled = logits / jnp.maximum(temperature, 1e-6)
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, neg, scaled)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, scaled, neg)


def next_token(
    logits: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_k: int,
    top_p: jax.Array,
    greedy: bool = False,
    nucleus: bool = True,
):
    """(token [B], log-prob [B] under the model's own distribution, temperature 1 and untruncated:
    what policy-gradient ratios need). Static switches skip work a request does not need: `greedy`
    (temperature 0: argmax only), `nucleus` False (top_p = 1: no sort over the vocabulary)."""
    logits = logits.astype(jnp.float32)
    top = jnp.max(logits, axis=-1, keepdims=True)
    if greedy:  # the first index of the max, as argmax (XLA:CPU's argmax reduce is ~3x slower)
        vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
        token = jnp.min(jnp.where(logits == top, vocab, logits.shape[-1]), axis=-1)
    else:
        if nucleus:
            z = truncated_logits(logits, temperature, top_k, top_p)
        else:
            z = logits / jnp.maximum(temperature, 1e-6)
            if top_k > 0:
                z = jnp.where(z < jax.lax.top_k(z, top_k)[0][:, -1:], jnp.finfo(jnp.float32).min, z)
        token = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
    # log-softmax at the chosen token only (no [B, V] log-probabilities)
    log_norm = top[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1))
    logp = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0] - log_norm
    return token, logp
