"""The blockwise kernel equals the dense reference (fp32, outputs and grads), skips hidden tiles,
and its compiled memory grows linearly in the sequence length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.ops.attention import dense_attention
from ernie_jax.ops.flash_attention import FULL, MASKED, SKIP, flash_attention, tile_kinds


def _inputs(b, s, n, kv, d, seed=0, packed=True, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, h, d)), dtype) for h in (n, kv, kv))
    seg = np.sort(rng.integers(1, 4, size=(b, s)), axis=1) if packed else np.ones((b, s))
    if packed:
        seg[:, s - s // 8 :] = 0  # padding at the end of each row
    return q, k, v, jnp.asarray(seg, jnp.int32)


def _check_against_dense(q, k, v, seg, *, causal, block_q, block_kv, index=None, tol=1e-5):
    flash = lambda q, k, v: flash_attention(
        q, k, v, seg, seg, index, index, causal=causal, block_q=block_q, block_kv=block_kv
    )
    dense = lambda q, k, v: dense_attention(q, k, v, seg, seg, index, index, causal=causal)
    w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    (out_f, grads_f), (out_d, grads_d) = (
        jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2)))(q, k, v)
        for f in (flash, dense)
    )
    np.testing.assert_allclose(jax.jit(flash)(q, k, v), jax.jit(dense)(q, k, v), atol=tol, rtol=tol)
    np.testing.assert_allclose(out_f, out_d, rtol=tol)
    for gf, gd in zip(grads_f, grads_d):
        np.testing.assert_allclose(gf, gd, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "n,kv,d,s,causal",
    [
        (4, 4, 24, 37, True),  # MHA, odd length, head_dim 24
        (8, 4, 64, 50, True),  # 2 query heads per kv head
        (8, 2, 128, 45, True),  # 4 per kv head, head_dim 128
        (8, 1, 64, 33, True),  # 8 per kv head (MQA)
        (4, 2, 24, 41, False),  # bidirectional (the ViT)
    ],
)
def test_equals_dense_outputs_and_grads(n, kv, d, s, causal):
    q, k, v, seg = _inputs(2, s, n, kv, d)
    _check_against_dense(q, k, v, seg, causal=causal, block_q=16, block_kv=8)


def test_reordered_tokens_stay_causal():
    """Context parallelism hands the kernel tokens out of order with their original indices."""
    q, k, v, seg = _inputs(1, 32, 4, 2, 16)
    perm = np.random.default_rng(3).permutation(32)
    take = lambda a: jnp.take(a, perm, axis=1)
    index = jnp.asarray(perm, jnp.int32)[None]
    _check_against_dense(
        take(q), take(k), take(v), take(seg), causal=True, block_q=8, block_kv=8, index=index
    )


def test_bf16_inputs_fp32_statistics():
    q, k, v, seg = _inputs(1, 64, 4, 2, 32, dtype=jnp.bfloat16)
    out = flash_attention(q, k, v, seg, seg, block_q=16, block_kv=16)
    assert out.dtype == jnp.bfloat16
    ref = dense_attention(*(x.astype(jnp.float32) for x in (q, k, v)), seg, seg)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_tile_kinds_skip_the_causal_triangle_and_foreign_segments():
    idx = jnp.arange(8)[None]
    one = jnp.ones((1, 8), jnp.int32)
    kinds = np.asarray(tile_kinds(one, one, idx, idx, True, 2, 2))
    assert (kinds[np.triu_indices(4, 1)] == SKIP).all()
    assert (np.diag(kinds) == MASKED).all() and (kinds[np.tril_indices(4, -1)] == FULL).all()
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2]])
    kinds = np.asarray(tile_kinds(seg, seg, idx, idx, False, 4, 4))
    assert kinds.tolist() == [[FULL, SKIP], [SKIP, FULL]]


def test_skipped_tiles_are_not_computed():
    """NaN values in keys that only skipped tiles would read never reach the output (a computed and
    masked tile would still multiply them by zero and give NaN, as the dense path does)."""
    q, k, v, _ = _inputs(1, 32, 2, 2, 8)
    seg = jnp.ones((1, 32), jnp.int32)
    v = v.at[:, 16:].set(jnp.nan)
    out = flash_attention(q, k, v, seg, seg, causal=True, block_q=8, block_kv=8)
    assert np.isfinite(np.asarray(out[:, :16])).all()
    assert np.isnan(np.asarray(dense_attention(q, k, v, seg, seg)[:, :16])).all()


def test_padding_rows_stay_finite():
    q, k, v, seg = _inputs(2, 40, 4, 2, 16)
    seg = seg.at[1].set(0)  # a row that is all padding
    grads = jax.grad(lambda q: flash_attention(q, k, v, seg, seg, block_q=8, block_kv=8).sum())(q)
    assert np.isfinite(np.asarray(grads)).all()


def _temp_bytes(s):
    q, k, v, seg = _inputs(1, s, 4, 2, 32, packed=False)
    f = jax.jit(
        jax.grad(
            lambda q, k, v: jnp.sum(flash_attention(q, k, v, seg, seg, block_q=128, block_kv=128)),
            argnums=(0, 1, 2),
        )
    )
    return f.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_compiled_memory_is_linear_in_sequence_length():
    t1, t2, t4 = (_temp_bytes(s) for s in (1024, 2048, 4096))
    # an S x S buffer would quadruple per doubling; tiles are fixed, the rest grows 2x
    assert t4 / t2 < 2.5 and t2 / t1 < 2.5, (t1, t2, t4)
    assert t4 < 4096 * 4096 * 4, t4  # less than one fp32 S x S score matrix for one head
