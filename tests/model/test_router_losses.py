"""Router terms against direct numpy implementations of the formulas in PaddlePaddle/ERNIE
ernie/moe/topk_gate.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.model import router_losses as rl


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 8)).astype(np.float32)
    mask = (rng.random(40) > 0.2).astype(np.float32)
    return logits, mask


def test_aux_loss(data):
    logits, mask = data
    p = _softmax(logits.astype(np.float64))
    k = 2
    top = np.argsort(-p, axis=-1)[:, :k]
    s = mask.sum()
    me = (p * mask[:, None]).sum(0) / s
    counts = np.zeros(8)
    for t in range(40):
        if mask[t]:
            for e in top[t]:
                counts[e] += 1
    ref = 8 * np.sum(me * counts / s)
    got = rl.aux_balance_loss(jnp.asarray(p, jnp.float32), jnp.asarray(top), jnp.asarray(mask))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # perfectly uniform routing gives the minimum value k
    uniform = rl.aux_balance_loss(jnp.full((8, 8), 1 / 8), jnp.arange(16).reshape(8, 2) % 8, jnp.ones(8))
    np.testing.assert_allclose(uniform, 2.0, rtol=1e-6)


def test_z_loss(data):
    logits, mask = data
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    ref = np.sum(lse**2 * mask) / mask.sum()
    np.testing.assert_allclose(rl.z_loss(jnp.asarray(logits), jnp.asarray(mask)), ref, rtol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_orthogonal_loss(groups):
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(16, 8))  # [H, E]
    w = kernel.T / np.linalg.norm(kernel.T, axis=-1, keepdims=True)
    e = 8 // groups
    ref = 0.0
    for g in range(groups):
        wg = w[g * e : (g + 1) * e]
        ref += np.sum((wg @ wg.T - np.eye(e)) ** 2)
    ref /= groups * e * e
    np.testing.assert_allclose(rl.orthogonal_loss(jnp.asarray(kernel, jnp.float32), groups), ref, rtol=1e-5)
    # orthonormal routers have zero loss
    q, _ = np.linalg.qr(rng.normal(size=(16, 8)))
    assert float(rl.orthogonal_loss(jnp.asarray(q, jnp.float32))) < 1e-10


def test_orthogonal_update_descends_and_matches_grad():
    rng = np.random.default_rng(2)
    kernel = jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32)  # stacked over 3 layers
    new = rl.orthogonal_update(kernel, rate=0.5)
    g = jax.grad(rl.orthogonal_loss)(kernel[1])
    np.testing.assert_allclose(new[1], kernel[1] - 0.5 * g, rtol=1e-6, atol=1e-7)
    for i in range(3):
        assert rl.orthogonal_loss(new[i]) < rl.orthogonal_loss(kernel[i])


def test_correction_bias_update():
    bias = jnp.zeros((2, 4))
    usage = jnp.array([[10.0, 0.0, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    new = rl.correction_bias_update(bias, usage, rate=1e-3)
    np.testing.assert_allclose(new, [[-1e-3, 1e-3, 0.0, 0.0], [0, 0, 0, 0]], atol=1e-9)
