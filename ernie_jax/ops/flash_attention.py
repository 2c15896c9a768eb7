"""Blockwise ("flash") attention in pure JAX: memory linear in the sequence length.

Online softmax over key/value tiles (Milakov & Gimelshein 2018; Dao 2023, FlashAttention-2 for the
backward pass). A custom VJP saves only the output and each row's log-sum-exp and recomputes the
tiles in the backward pass, so no S x T array exists in either direction.

The mask is given by vectors, never by an S x T array (FlashMask's idea, Wang et al. 2024):
- segment ids: a query sees only keys of its own segment (packed documents, one ViT frame);
- token indices: with `causal`, a query sees keys whose index is <= its own. The indices are
  explicit so that a reordered sequence (load-balanced context parallelism) stays causal.
Tiles that the mask hides entirely are skipped: the causal upper triangle, and tiles whose
segment-id ranges do not overlap. The loops only visit the span of tiles a block needs, and a
`lax.cond` skips the hidden tiles inside it.

Dims: B batch, S query length, T key length, K kv heads, G query heads per kv head (GQA: K/V are
never repeated), D head dim; bq / bk tile lengths.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Masked logits: finite, so rows stay finite and exp(MASK_VALUE - m) underflows to exactly 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_Q_PAD, _KV_PAD = -1, -2            # segment ids of padding rows: they match nothing real
_BIG_INDEX = np.iinfo(np.int32).max


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                    kv_segment_ids: jax.Array, q_index: jax.Array | None = None,
                    kv_index: jax.Array | None = None, *, causal: bool = True, block_q: int = 512,
                    block_kv: int = 512, scale: float | None = None) -> jax.Array:
    """q [B,S,N,D], k/v [B,T,K,D] (K divides N), segment ids [B,S] / [B,T] (int), token indices
    [B,S] / [B,T] (default 0..S-1 / 0..T-1; used only when `causal`) -> [B,S,N,D] in q's dtype.
    Logits, softmax statistics and accumulators are fp32 whatever the input dtype."""
    b, s, n, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    if n % kvh:
        raise ValueError(f"{n} query heads are not a multiple of {kvh} kv heads")
    g = n // kvh
    scale = d ** -0.5 if scale is None else scale
    if q_index is None:
        q_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if kv_index is None:
        kv_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bq, bk = _block(block_q, s), _block(block_kv, t)
    sp, tp = round_up(s, bq), round_up(t, bk)
    # head-major layouts, so every tile product is a plain batched matmul over (B, K)
    qh = pad_axis(q.reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4), 3, sp)      # [B,K,G,S,D]
    kh = pad_axis(k.transpose(0, 2, 1, 3), 2, tp)                                   # [B,K,T,D]
    vh = pad_axis(v.transpose(0, 2, 1, 3), 2, tp)
    qseg = pad_axis(q_segment_ids.astype(jnp.int32), 1, sp, _Q_PAD)
    kseg = pad_axis(kv_segment_ids.astype(jnp.int32), 1, tp, _KV_PAD)
    qidx = pad_axis(q_index.astype(jnp.int32), 1, sp, -1)
    kidx = pad_axis(kv_index.astype(jnp.int32), 1, tp, _BIG_INDEX)
    out = _flash(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk, float(scale))
    return out[:, :, :, :s].transpose(0, 3, 1, 2, 4).reshape(b, s, n, d)


def _block(block: int, length: int) -> int:
    return max(1, min(block, length))


def round_up(x: int, m: int) -> int:
    """The smallest multiple of m that is >= x."""
    return -(-x // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """x padded with `value` at the end of `axis` to length `size`."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


SKIP, MASKED, FULL = 0, 1, 2      # tile kinds: hidden, partly visible, wholly visible


def tile_kinds(qseg, kseg, qidx, kidx, causal: bool, bq: int, bk: int) -> jax.Array:
    """[nq, nk] int32 tile kinds over the whole batch: SKIP where the mask hides every entry of the
    tile in every row, FULL where it hides none (no mask is applied), MASKED otherwise."""
    b = qseg.shape[0]
    qs, ks = qseg.reshape(b, -1, bq), kseg.reshape(b, -1, bk)
    q_lo, q_hi = qs.min(-1)[:, :, None], qs.max(-1)[:, :, None]
    k_lo, k_hi = ks.min(-1)[:, None, :], ks.max(-1)[:, None, :]
    need = (q_lo <= k_hi) & (k_lo <= q_hi)                       # segment-id ranges overlap
    full = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)       # one segment on both sides
    if causal:
        qi, ki = qidx.reshape(b, -1, bq), kidx.reshape(b, -1, bk)
        need &= qi.max(-1)[:, :, None] >= ki.min(-1)[:, None, :]
        full &= qi.min(-1)[:, :, None] >= ki.max(-1)[:, None, :]
    return jnp.where(need.any(0), jnp.where(full.all(0), FULL, MASKED), SKIP).astype(jnp.int32)


def _span(row: jax.Array) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last True of a bool vector ((0, 0) when none)."""
    n = row.shape[0]
    first = jnp.argmax(row)
    last = n - jnp.argmax(row[::-1])
    return jnp.where(row.any(), first, 0), jnp.where(row.any(), last, 0)


def _tile_mask(qseg_i, kseg_j, qidx_i, kidx_j, causal: bool) -> jax.Array:
    """[B,1,1,bq,bk] bool for one tile, from the tile's vectors."""
    mask = qseg_i[:, :, None] == kseg_j[:, None, :]
    if causal:
        mask &= qidx_i[:, :, None] >= kidx_j[:, None, :]
    return mask[:, None, None]


def _slice(x: jax.Array, start, size: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start * size, size, axis)


def _logits(qi, kj, mask, scale):
    s = jnp.einsum("bkgqd,bktd->bkgqt", qi, kj, preferred_element_type=jnp.float32) * scale
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _visit(kind, tile, carry):
    """Run `tile(carry, masked)` for a MASKED or FULL tile, leave the carry for a SKIP tile."""
    return jax.lax.switch(kind, [lambda c: c, lambda c: tile(c, True), lambda c: tile(c, False)], carry)


def _forward(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk, scale):
    """(out [B,K,G,S,D] in q's dtype, lse [B,K,G,S] fp32)."""
    b, kvh, g, sp, d = qh.shape
    nq, nk = sp // bq, kh.shape[2] // bk
    kinds = tile_kinds(qseg, kseg, qidx, kidx, causal, bq, bk)

    def q_block(i):
        qi = _slice(qh, i, bq, 3)
        qseg_i, qidx_i = _slice(qseg, i, bq, 1), _slice(qidx, i, bq, 1)

        def kv_tile(j, carry):
            def compute(carry, masked):
                m, l, acc = carry
                kj, vj = _slice(kh, j, bk, 2), _slice(vh, j, bk, 2)
                mask = _tile_mask(qseg_i, _slice(kseg, j, bk, 1), qidx_i, _slice(kidx, j, bk, 1), causal) \
                    if masked else None
                s = _logits(qi, kj, mask, scale)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgqt,bktd->bkgqd", p.astype(vh.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv
            return _visit(kinds[i, j], compute, carry)

        init = (jnp.full((b, kvh, g, bq), MASK_VALUE, jnp.float32), jnp.zeros((b, kvh, g, bq), jnp.float32),
                jnp.zeros((b, kvh, g, bq, d), jnp.float32))
        lo, hi = _span(kinds[i] != SKIP)
        m, l, acc = jax.lax.fori_loop(lo, hi, kv_tile, init)
        l = jnp.where(l == 0, 1.0, l)                 # a block that sees no tile at all
        return (acc / l[..., None]).astype(qh.dtype), m + jnp.log(l)

    out, lse = jax.lax.map(q_block, jnp.arange(nq))   # [nq, B,K,G,bq,(D)]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kvh, g, sp, d)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kvh, g, sp)
    return out, lse


def _backward(qh, kh, vh, qseg, kseg, qidx, kidx, out, lse, dout, causal, bq, bk, scale):
    """(dq, dk, dv) by recomputing each needed tile; outer loop over key tiles, dq accumulated."""
    b, kvh, g, sp, d = qh.shape
    tp = kh.shape[2]
    nk = tp // bk
    kinds = tile_kinds(qseg, kseg, qidx, kidx, causal, bq, bk)
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)     # [B,K,G,S]

    def kv_block(dq, j):
        kj, vj = _slice(kh, j, bk, 2), _slice(vh, j, bk, 2)
        kseg_j, kidx_j = _slice(kseg, j, bk, 1), _slice(kidx, j, bk, 1)

        def q_tile(i, carry):
            def compute(carry, masked):
                dq, dk, dv = carry
                qi, doi = _slice(qh, i, bq, 3), _slice(dout, i, bq, 3)
                mask = _tile_mask(_slice(qseg, i, bq, 1), kseg_j, _slice(qidx, i, bq, 1), kidx_j, causal) \
                    if masked else None
                p = jnp.exp(_logits(qi, kj, mask, scale) - _slice(lse, i, bq, 3)[..., None])
                dv = dv + jnp.einsum("bkgqt,bkgqd->bktd", p.astype(doi.dtype), doi,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqd,bktd->bkgqt", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - _slice(delta, i, bq, 3)[..., None]) * scale).astype(qh.dtype)
                dq_i = jnp.einsum("bkgqt,bktd->bkgqd", ds, kj, preferred_element_type=jnp.float32)
                dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, i, bq, 3) + dq_i, i * bq, 3)
                dk = dk + jnp.einsum("bkgqt,bkgqd->bktd", ds, qi, preferred_element_type=jnp.float32)
                return dq, dk, dv
            return _visit(kinds[i, j], compute, carry)

        zeros = jnp.zeros((b, kvh, bk, d), jnp.float32)
        lo, hi = _span(kinds[:, j] != SKIP)
        dq, dk, dv = jax.lax.fori_loop(lo, hi, q_tile, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(qh.shape, jnp.float32), jnp.arange(nk))
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, kvh, tp, d)
    dv = jnp.moveaxis(dv, 0, 2).reshape(b, kvh, tp, d)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk, scale):
    return _forward(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk, scale)[0]


def _flash_fwd(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk, scale):
    out, lse = _forward(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk, scale)
    return out, (qh, kh, vh, qseg, kseg, qidx, kidx, out, lse)


def _flash_bwd(causal, bq, bk, scale, residuals, dout):
    qh, kh, vh, qseg, kseg, qidx, kidx, out, lse = residuals
    dq, dk, dv = _backward(qh, kh, vh, qseg, kseg, qidx, kidx, out, lse, dout, causal, bq, bk, scale)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
