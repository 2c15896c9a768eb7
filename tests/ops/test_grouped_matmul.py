"""The dropless grouped matmul: on CPU, one-expert row blocks with a hand-written backward, equal to
`jax.lax.ragged_dot` (outputs and gradients) for any split of the rows, batched under vmap; the
compiled CPU program runs the blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.ops.grouped_matmul import blocked_ragged_dot, block_size, ragged_dot

SPLITS = {
    "random": (300, [37, 0, 81, 5, 0, 64, 90, 13]),  # 290 rows in groups, some empty
    "tail": (300, [0, 64, 0, 1, 0, 0, 0, 100]),  # rows past the sum are zeros
    "one group": (70, [0, 0, 0, 0, 0, 0, 0, 70]),
    "no rows": (40, [0] * 8),
}


@pytest.mark.parametrize("split", SPLITS, ids=list(SPLITS))
def test_blocks_equal_ragged_dot_with_grads(split):
    m, sizes = SPLITS[split]
    sizes = jnp.asarray(sizes, jnp.int32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(m, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 24, 40)), jnp.float32)
    loss = lambda f: lambda x, w: (f(x, w, sizes) ** 3).sum()
    want = jax.lax.ragged_dot(x, w, sizes)
    got = jax.jit(blocked_ragged_dot)(x, w, sizes)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not np.asarray(got[int(sizes.sum()) :]).any()
    ours = jax.jit(jax.grad(loss(ragged_dot), (0, 1)))(x, w)
    for g, r in zip(ours, jax.grad(loss(jax.lax.ragged_dot), (0, 1))(x, w)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3 * float(jnp.abs(r).max()))


def test_vmapped_and_bfloat16_like_ragged_dot():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 90, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(2, 4, 16, 8)), jnp.bfloat16)
    sizes = jnp.array([[10, 20, 30, 30], [0, 0, 45, 40]], jnp.int32)
    got = jax.jit(jax.vmap(ragged_dot))(x, w, sizes)
    want = jax.vmap(jax.lax.ragged_dot)(x, w, sizes)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), rtol=2e-2, atol=5e-2)


def test_cpu_program_has_no_ragged_dot_and_blocks_scale_with_rows():
    x, w, sizes = jnp.ones((512, 16)), jnp.ones((8, 16, 8)), jnp.full((8,), 64, jnp.int32)
    hlo = jax.jit(ragged_dot).lower(x, w, sizes).compile().as_text()
    assert "while" in hlo  # the block scan (XLA:CPU's ragged dot expansion has no loop)
    assert [block_size(m, 8) for m in (16, 1024, 4096, 1 << 20)] == [32, 64, 256, 256]
    assert block_size(16384, 64) == 128
