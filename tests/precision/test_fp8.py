"""FP8 (emulated on CPU): rounding bounds, scaling recipes, gradients, and a short training run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.config import load_config
from ernie_jax.precision.fp8 import E4M3, E5M2, Fp8, grad_e5m2, qdq_blocks, qdq_rows, qdq_tensor
from ernie_jax.trainers.loop import run
from ernie_jax.trainers.pretrain import text_pretraining_task


@pytest.mark.parametrize("dtype, bound", [(E4M3, 2.0 ** -4), (E5M2, 2.0 ** -3)])
def test_rounding_error_bounds(dtype, bound):
    x = jnp.asarray(np.random.default_rng(0).uniform(1 / 32, 1, 4096) * np.sign(np.random.default_rng(1).normal(
        size=4096)), jnp.float32)
    q = qdq_tensor(x, dtype)
    rel = np.abs(np.asarray(q - x)) / np.abs(np.asarray(x))
    assert rel.max() <= bound + 1e-7
    assert rel.max() > 0  # it really rounds
    # values land on the fp8 grid (after undoing the scale)
    scale = float(jnp.max(jnp.abs(x))) / (448.0 if dtype == E4M3 else 57344.0)
    grid = np.asarray(q) / scale
    np.testing.assert_allclose(grid.astype(dtype).astype(np.float32), grid, rtol=1e-6)


def test_blockwise_scaling_isolates_outliers():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 256)).astype(np.float32) * 1e-3
    x[:, :128] *= 1e6                              # one loud tile per row
    err_tensor = np.abs(np.asarray(qdq_tensor(jnp.asarray(x))) - x)[:, 128:].mean()
    err_rows = np.abs(np.asarray(qdq_rows(jnp.asarray(x))) - x)[:, 128:].mean()
    assert err_rows < err_tensor / 10
    w = rng.normal(size=(256, 256)).astype(np.float32)
    w[:128, :128] *= 1e6
    assert np.abs(np.asarray(qdq_blocks(jnp.asarray(w))) - w)[128:, 128:].mean() < \
        np.abs(np.asarray(qdq_tensor(jnp.asarray(w))) - w)[128:, 128:].mean() / 10


@pytest.mark.parametrize("recipe", ["current", "blockwise"])
def test_fp8_dot_gradients_close_to_reference(recipe):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(256, 128)) * 0.05, jnp.float32)
    t = jnp.asarray(rng.normal(size=(64, 128)), jnp.float32)
    fp8 = Fp8(recipe)
    dims = (((1,), (0,)), ((), ()))

    def loss(dot, x, w):
        return jnp.mean((dot(x, w, dims) - t) ** 2)
    ref = jax.grad(lambda x, w: loss(jax.lax.dot_general, x, w), argnums=(0, 1))(x, w)
    got = jax.grad(lambda x, w: loss(fp8.dot_general, x, w), argnums=(0, 1))(x, w)
    for r, g in zip(ref, got):
        rel = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
        assert 0 < rel < 0.08, rel   # e4m3 forward + e5m2 backward, stated tolerance 8% (norm-wise)


def test_gradient_is_rounded_to_e5m2():
    g = jax.grad(lambda y: jnp.sum(grad_e5m2(y) * jnp.linspace(0.1, 1.0, 7)))(jnp.ones(7))
    scale = float(jnp.max(jnp.abs(g))) / 57344.0
    np.testing.assert_allclose(np.asarray(g / scale).astype(E5M2).astype(np.float32), np.asarray(g / scale), rtol=1e-6)
    assert not np.allclose(g, np.linspace(0.1, 1.0, 7), rtol=1e-6)


def _final_loss(workdir, *sets):
    cfg = load_config("configs/tiny_moe.yaml", [
        "model.num_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "moe.intermediate_size=64",
        "model.dtype=bfloat16", "data.seq_len=64", "data.batch_size=8", "train.steps=200", "log.interval=50",
        "train.eval_interval=1000", "checkpoint.interval=1000", "checkpoint.async_save=false",
        "optimizer.warmup_steps=20", *sets])
    run(cfg, str(workdir), text_pretraining_task, quiet=True)
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [r["lm_loss"] for r in rows if "lm_loss" in r][-1]


@pytest.mark.slow
@pytest.mark.parametrize("mode, recipe", [("experts", "blockwise"), ("all_linear", "current")])
def test_200_step_training_matches_bf16(tmp_path, mode, recipe):
    bf16 = _final_loss(tmp_path / "bf16")
    fp8 = _final_loss(tmp_path / "fp8", f"precision.fp8={mode}", f"precision.fp8_recipe={recipe}")
    assert abs(fp8 - bf16) / bf16 < 0.02, (fp8, bf16)
