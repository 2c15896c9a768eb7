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
_Q_PAD, _KV_PAD = -1, -2  # segment ids of padding rows: they match nothing real
_BIG_INDEX = np.iinfo(np.int32).max


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_index: jax.Array | None = None,
    kv_index: jax.Array | None = None,
    *,
    causal: bool = True,
    block_q: int = 512,
    block_kv: int = 512,
    scale: float | None = None,
) -> jax.Array:
    """q [B,S,N,D], k/v [B,T,K,D] (K divides N), segment ids [B,S] / [B,T] (int), token indices
    [B,S] / [B,T] (default 0..S-1 / 0..T-1; used only when `causal`) -> [B,S,N,D] in q's dtype.
    Logits, softmax statistics and accumulators are fp32 whatever the input dtype."""
    b, s, n, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    if n % kvh:
        raise ValueError(f"{n} query heads are not a multiple of {kvh} kv heads")
    g = n // kvh
    scale = d**-0.5 if scale is None else scale
    if q_index is None:
        q_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if kv_index is None:
        kv_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bq, bk = _block(block_q, s), _block(block_kv, t)
    sp, tp = round_up(s, bq), round_up(t, bk)
    # head-major layouts, so every tile product is a plain batched matmul over (B, K)
    qh = pad_axis(q.reshape(b, s, kvh, g, d).transpose(0, 2, 3, 1, 4), 3, sp)  # [B,K,G,S,D]
    kh = pad_axis(k.transpose(0, 2, 1, 3), 2, tp)  # [B,K,T,D]
    vh = pad_axis(v.transpose(0, 2, 1, 3), 2, tp)
    qseg = pad_axis(q_segment_ids.astype(jnp.int32), 1, sp, _Q_PAD)
    kseg = pad_axis(kv_segment_ids.astype(jnp.int32), 1, tp, _KV_PAD)
    qidx = pad_axis(q_index.astype(jnp.int32), 1, sp, -1)
    kidx = pad_axis(kv_index.astype(jnp.int32), 1, tp, _BIG_INDEX)

    # the scale is applied to q outside the custom VJP, so autodiff carries it into dq; rows go
    # one at a time, so a tile is one row's [K,G,bq,bk] and stays in cache whatever the batch
    def row(args):
        return _flash(*(a[None] for a in args), causal, bq, bk)[0]

    out = jax.lax.map(row, (qh * jnp.asarray(scale, qh.dtype), kh, vh, qseg, kseg, qidx, kidx))
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


SKIP, MASKED, FULL = 0, 1, 2  # tile kinds: hidden, partly visible, wholly visible


def tile_kinds(qseg, kseg, qidx, kidx, causal: bool, bq: int, bk: int) -> jax.Array:
    """[nq, nk] int32 tile kinds over the whole batch: SKIP where the mask hides every entry of the
    tile in every row, FULL where it hides none (no mask is applied), MASKED otherwise."""
    b = qseg.shape[0]
    qs, ks = qseg.reshape(b, -1, bq), kseg.reshape(b, -1, bk)
    q_lo, q_hi = qs.min(-1)[:, :, None], qs.max(-1)[:, :, None]
    k_lo, k_hi = ks.min(-1)[:, None, :], ks.max(-1)[:, None, :]
    need = (q_lo <= k_hi) & (k_lo <= q_hi)  # segment-id ranges overlap
    full = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)  # one segment on both sides
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


def _tile_mask(qseg_i, kseg_j, qidx_i, kidx_j, causal: bool, keys_first: bool = False) -> jax.Array:
    """One tile's mask from its vectors: [B,1,1,bq,bk], or [B,1,bk,1,bq] with `keys_first`."""
    mask = qseg_i[:, :, None] == kseg_j[:, None, :]
    if causal:
        mask &= qidx_i[:, :, None] >= kidx_j[:, None, :]
    return jnp.swapaxes(mask, 1, 2)[:, None, :, None] if keys_first else mask[:, None, None]


def _visit(kind, tile, carry):
    """Run `tile(carry, masked)` for a MASKED or FULL tile, leave the carry for a SKIP tile."""
    return jax.lax.switch(kind, [lambda c: c, lambda c: tile(c, True), lambda c: tile(c, False)], carry)


def _masked(s, mask):
    return s if mask is None else jnp.where(mask, s, MASK_VALUE)


def _blocks(x: jax.Array, axis: int, size: int, transpose: bool = False) -> jax.Array:
    """[B,K,...,L,D] split into tiles of `size` along `axis` (L), tile index first, so each tile is
    one contiguous slab: [n,B,K,...,size,D]; `transpose` puts D right after B,K ([n,B,K,D,...,size]),
    a pre-transposed operand for the tile matmuls."""
    n = x.shape[axis] // size
    x = jnp.moveaxis(x.reshape(*x.shape[:axis], n, size, *x.shape[axis + 1 :]), axis, 0)
    return jnp.moveaxis(x, -1, 3) if transpose else x


def _f32(x):
    return x.astype(jnp.float32)


# Layouts: q-side tiles [B,K,G,bq,D] (q, dout) and [B,K,D,G,bq] (transposed); key-side tiles
# [B,K,bk,D] (k, v) and [B,K,D,bk] (transposed); per-row statistics [B,K,G,bq]. Operands are
# pre-transposed once (O(S) copies) so that every tile product is a contiguous matmul.


def _forward(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk):
    """softmax(q k^T) v with q already scaled: (out [B,K,G,S,D] in q's dtype, lse [B,K,G,S] fp32)."""
    b, kvh, g, sp, d = qh.shape
    kinds = tile_kinds(qseg, kseg, qidx, kidx, causal, bq, bk)
    q_t, kt_t, v_t = _blocks(qh, 3, bq), _blocks(kh, 2, bk, transpose=True), _blocks(vh, 2, bk)
    qseg_t, qidx_t = _blocks(qseg, 1, bq), _blocks(qidx, 1, bq)
    kseg_t, kidx_t = _blocks(kseg, 1, bk), _blocks(kidx, 1, bk)

    def q_block(i):
        qi = q_t[i]

        def kv_tile(j, carry):
            def compute(carry, masked):
                m, denom, acc = carry
                mask = _tile_mask(qseg_t[i], kseg_t[j], qidx_t[i], kidx_t[j], causal) if masked else None
                s = _masked(
                    jnp.einsum("bkgqd,bkdt->bkgqt", qi, kt_t[j], preferred_element_type=jnp.float32), mask
                )
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum(
                    "bkgqt,bktd->bkgqd", p.astype(vh.dtype), v_t[j], preferred_element_type=jnp.float32
                )
                return m_new, denom * corr + p.sum(-1), acc * corr[..., None] + pv

            return _visit(kinds[i, j], compute, carry)

        init = (
            jnp.full((b, kvh, g, bq), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kvh, g, bq), jnp.float32),
            jnp.zeros((b, kvh, g, bq, d), jnp.float32),
        )
        lo, hi = _span(kinds[i] != SKIP)
        m, denom, acc = jax.lax.fori_loop(lo, hi, kv_tile, init)
        denom = jnp.where(denom == 0, 1.0, denom)  # a block that sees no tile at all
        return (acc / denom[..., None]).astype(qh.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(q_block, jnp.arange(sp // bq))  # [nq, B,K,G,bq,(D)]
    return jnp.moveaxis(out, 0, 3).reshape(b, kvh, g, sp, d), jnp.moveaxis(lse, 0, 3).reshape(b, kvh, g, sp)


def _backward(qh, kh, vh, qseg, kseg, qidx, kidx, out, lse, dout, causal, bq, bk):
    """(dq, dk, dv) in two passes that recompute each needed tile (FlashAttention-2): one over key
    tiles accumulating dK / dV (tiles in keys-first layout), one over query tiles accumulating dQ.
    Each loop carries only its own tile's accumulators, never a whole-sequence buffer."""
    b, kvh, g, sp, d = qh.shape
    tp = kh.shape[2]
    nq, nk = sp // bq, tp // bk
    kinds = tile_kinds(qseg, kseg, qidx, kidx, causal, bq, bk)
    delta = jnp.sum(_f32(dout) * _f32(out), axis=-1)  # [B,K,G,S]
    q_t, qT_t = _blocks(qh, 3, bq), _blocks(qh, 3, bq, transpose=True)
    do_t, doT_t = _blocks(dout, 3, bq), _blocks(dout, 3, bq, transpose=True)
    lse_t, delta_t = _blocks(lse, 3, bq), _blocks(delta, 3, bq)
    k_t, kt_t = _blocks(kh, 2, bk), _blocks(kh, 2, bk, transpose=True)
    v_t, vt_t = _blocks(vh, 2, bk), _blocks(vh, 2, bk, transpose=True)
    qseg_t, qidx_t = _blocks(qseg, 1, bq), _blocks(qidx, 1, bq)
    kseg_t, kidx_t = _blocks(kseg, 1, bk), _blocks(kidx, 1, bk)

    def kv_block(j):
        def q_tile(i, carry):
            def compute(carry, masked):
                dk, dv = carry
                mask = (
                    _tile_mask(qseg_t[i], kseg_t[j], qidx_t[i], kidx_t[j], causal, keys_first=True)
                    if masked
                    else None
                )
                s_t = jnp.einsum("bktd,bkdgq->bktgq", k_t[j], qT_t[i], preferred_element_type=jnp.float32)
                p_t = jnp.exp(_masked(s_t, mask) - lse_t[i][:, :, None])
                dv = dv + jnp.einsum(
                    "bktgq,bkgqd->bktd", p_t.astype(dout.dtype), do_t[i], preferred_element_type=jnp.float32
                )
                dp_t = jnp.einsum("bktd,bkdgq->bktgq", v_t[j], doT_t[i], preferred_element_type=jnp.float32)
                ds_t = (p_t * (dp_t - delta_t[i][:, :, None])).astype(qh.dtype)
                dk = dk + jnp.einsum("bktgq,bkgqd->bktd", ds_t, q_t[i], preferred_element_type=jnp.float32)
                return dk, dv

            return _visit(kinds[i, j], compute, carry)

        zeros = jnp.zeros((b, kvh, bk, d), jnp.float32)
        lo, hi = _span(kinds[:, j] != SKIP)
        return jax.lax.fori_loop(lo, hi, q_tile, (zeros, zeros))

    def q_block(i):
        def kv_tile(j, dq):
            def compute(dq, masked):
                mask = _tile_mask(qseg_t[i], kseg_t[j], qidx_t[i], kidx_t[j], causal) if masked else None
                s = jnp.einsum("bkgqd,bkdt->bkgqt", q_t[i], kt_t[j], preferred_element_type=jnp.float32)
                p = jnp.exp(_masked(s, mask) - lse_t[i][..., None])
                dp = jnp.einsum("bkgqd,bkdt->bkgqt", do_t[i], vt_t[j], preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_t[i][..., None])).astype(kh.dtype)
                return dq + jnp.einsum("bkgqt,bktd->bkgqd", ds, k_t[j], preferred_element_type=jnp.float32)

            return _visit(kinds[i, j], compute, dq)

        lo, hi = _span(kinds[i] != SKIP)
        return jax.lax.fori_loop(lo, hi, kv_tile, jnp.zeros((b, kvh, g, bq, d), jnp.float32))

    dk, dv = jax.lax.map(kv_block, jnp.arange(nk))  # [nk, B,K,bk,D]
    dq = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B,K,G,bq,D]
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, kvh, tp, d)
    dv = jnp.moveaxis(dv, 0, 2).reshape(b, kvh, tp, d)
    dq = jnp.moveaxis(dq, 0, 3).reshape(b, kvh, g, sp, d)
    return dq.astype(qh.dtype), dk.astype(kh.dtype), dv.astype(vh.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _flash(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk):
    return _forward(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk)[0]


def _flash_fwd(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk):
    out, lse = _forward(qh, kh, vh, qseg, kseg, qidx, kidx, causal, bq, bk)
    return out, (qh, kh, vh, qseg, kseg, qidx, kidx, out, lse)


def _flash_bwd(causal, bq, bk, residuals, dout):
    qh, kh, vh, qseg, kseg, qidx, kidx, out, lse = residuals
    dq, dk, dv = _backward(qh, kh, vh, qseg, kseg, qidx, kidx, out, lse, dout, causal, bq, bk)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
