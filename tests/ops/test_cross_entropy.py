"""The chunked LM head + cross-entropy equals the unchunked one (fp32: losses and grads, rel 1e-6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.ops.cross_entropy import chunked_head_cross_entropy, token_cross_entropy


@pytest.mark.parametrize("s,chunk,shards", [(50, 16, 1), (48, 7, 2), (64, 64, 4), (40, 0, 1)])
def test_chunked_equals_full(s, chunk, shards):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, s, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 97)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 97, (2, s)), jnp.int32)
    weights = jnp.asarray(rng.random((2, s)), jnp.float32)

    def loss(h, w, chunked):
        head = lambda x: x @ w
        ce = (
            chunked_head_cross_entropy(head, h, labels, chunk, shards)
            if chunked
            else token_cross_entropy(head(h), labels)
        )
        return jnp.sum(ce * weights), ce

    (v1, ce1), g1 = jax.jit(jax.value_and_grad(lambda h, w: loss(h, w, True), argnums=(0, 1), has_aux=True))(
        h, w
    )
    (v0, ce0), g0 = jax.jit(jax.value_and_grad(lambda h, w: loss(h, w, False), argnums=(0, 1), has_aux=True))(
        h, w
    )
    np.testing.assert_allclose(ce1, ce0, rtol=1e-6)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(g1, g0):  # relative to the gradient's norm: fp32 reassociation moves single entries
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)


def test_no_full_logits_in_the_compiled_step():
    """The compiled grad never holds [B, S, V]: its temp memory is far below one logits array."""
    b, s, hdim, v = 1, 4096, 32, 4096
    h = jnp.zeros((b, s, hdim), jnp.float32)
    w = jnp.zeros((hdim, v), jnp.float32)
    labels = jnp.zeros((b, s), jnp.int32)
    f = jax.jit(
        jax.grad(
            lambda h, w: chunked_head_cross_entropy(lambda x: x @ w, h, labels, 256).sum(), argnums=(0, 1)
        )
    )
    temp = f.lower(h, w).compile().memory_analysis().temp_size_in_bytes
    assert temp < b * s * v * 4 / 4, temp
