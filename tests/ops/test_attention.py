"""The backend dispatcher: resolution per platform, one-line errors, and the Pallas kernels (TPU
splash, GPU flash) in interpret mode on the CPU against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.errors import ConfigError
from ernie_jax.ops.attention import (
    AttentionSpec,
    check_backend,
    dense_attention,
    dot_product_attention,
    resolve_backend,
    splash_attention,
    splash_mask_fits,
)
from tests.ops.test_flash_attention import _inputs


def test_auto_picks_the_platform_kernel():
    assert resolve_backend("auto", "tpu") == "splash"
    assert resolve_backend("auto", "cuda") == "cudnn"
    assert resolve_backend("auto", "cpu") == "flash"
    assert resolve_backend("auto", "cpu", 512) == "dense" and resolve_backend("auto", "cpu", 513) == "flash"
    assert resolve_backend("auto", "tpu", 128) == "splash"


@pytest.mark.parametrize(
    "name,platform,words",
    [("splash", "cpu", "needs a TPU"), ("cudnn", "cpu", "needs a GPU"), ("magic", "cpu", "is not a backend")],
)
def test_backend_errors_name_the_setting(name, platform, words):
    with pytest.raises(ConfigError, match=words) as e:
        check_backend(name, platform)
    assert "model.attention" in str(e.value) and "\n" not in str(e.value)


def _compare(spec, q, k, v, seg, tol=2e-5):
    f = lambda q, k, v: dot_product_attention(q, k, v, seg, seg, spec=spec)
    r = lambda q, k, v: dense_attention(q, k, v, seg, seg, causal=spec.causal)
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    (of, gf), (od, gd) = (
        jax.jit(jax.value_and_grad(lambda *a: jnp.sum(g(*a) * w), argnums=(0, 1, 2)))(q, k, v) for g in (f, r)
    )
    np.testing.assert_allclose(of, od, rtol=tol)
    for a, b in zip(gf, gd):
        np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_in_interpret_mode_equals_dense(causal):
    q, k, v, seg = _inputs(1, 150, 4, 2, 64)  # GQA, packed, padded to the 128 tile
    _compare(
        AttentionSpec(backend="splash", block_q=128, block_kv=128, causal=causal, interpret=True),
        q,
        k,
        v,
        seg,
    )


def test_pallas_gpu_kernel_in_interpret_mode_equals_dense():
    """The cudnn backend's path for packed rows (the Pallas GPU flash kernel, which takes segment ids)."""
    q, k, v, seg = _inputs(1, 70, 4, 2, 32)
    _compare(AttentionSpec(backend="cudnn", causal=True, interpret=True), q, k, v, seg)


def test_dense_and_flash_agree_through_the_dispatcher():
    q, k, v, seg = _inputs(2, 40, 4, 2, 16)
    out = dot_product_attention(
        q, k, v, seg, seg, spec=AttentionSpec(backend="flash", block_q=16, block_kv=16)
    )
    ref = dot_product_attention(q, k, v, seg, seg, spec=AttentionSpec(backend="dense"))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # no segment ids means one segment per row
    np.testing.assert_allclose(
        dot_product_attention(q, k, v, spec=AttentionSpec(backend="flash")),
        dense_attention(q, k, v, jnp.zeros((2, 40), jnp.int32), jnp.zeros((2, 40), jnp.int32)),
        atol=1e-5,
    )


def test_splash_causal_offset_is_a_chunk_of_the_full_mask():
    """Context parallelism runs splash per query chunk with a static causal offset."""
    q, k, v, seg = _inputs(1, 256, 4, 2, 32)
    spec = AttentionSpec(backend="splash", block_q=128, block_kv=128, interpret=True)
    out = splash_attention(q[:, 128:], k, v, seg[:, 128:], seg, spec, causal_offset=128)
    np.testing.assert_allclose(out, dense_attention(q, k, v, seg, seg)[:, 128:], atol=2e-5)


def test_rows_too_long_for_splash_mask_memory_use_flash():
    """A 1M-patch ViT row needs an 8 MiB splash block mask (the TPU core has 1 MiB of scalar memory):
    such rows go to flash, the decoder's 131072-token rows stay on splash."""
    spec = AttentionSpec(backend="splash", block_q=512, block_kv=512)
    assert splash_mask_fits(131072, 131072, spec) and not splash_mask_fits(1 << 20, 1 << 20, spec)
    tiny = AttentionSpec(backend="splash", block_q=8, block_kv=8, causal=False, interpret=True)
    assert not splash_mask_fits(4104, 4104, tiny)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 4104, 1, 8)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.repeat(np.arange(1, 28), 152)[None], jnp.int32)  # 27 "images"
    got = dot_product_attention(q, k, v, seg, seg, spec=tiny)  # interpret-mode splash would take minutes
    want = dense_attention(q, k, v, seg, seg, causal=False)
    np.testing.assert_allclose(got, want, atol=2e-5)
