import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import load_config
from ernie_jax.model import router_losses
from ernie_jax.model import build_model
from ernie_jax.model.ernie import ModelOutput
from ernie_jax.parallel.mesh import build_mesh
from ernie_jax.trainers.lm import lm_objective, mtp_loss, mtp_token_nll, token_cross_entropy
from ernie_jax.trainers.state import init_train_state, lr_schedule, make_optimizer, param_groups
from ernie_jax.trainers.step import make_train_step


def _cfg(*sets):
    return load_config(
        "configs/tiny_moe.yaml",
        [
            "model.num_layers=2",
            "model.hidden_size=32",
            "model.vocab_size=64",
            "model.intermediate_size=64",
            "moe.intermediate_size=16",
            *sets,
        ],
    )


def test_wsd_and_cosine_schedules():
    o = _cfg(
        "optimizer.learning_rate=1.0",
        "optimizer.min_lr_ratio=0.1",
        "optimizer.warmup_steps=10",
        "optimizer.decay_fraction=0.2",
    ).optimizer
    wsd = lr_schedule(o, 100)
    assert float(wsd(0)) == pytest.approx(0.1) and float(wsd(9)) == pytest.approx(1.0)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(80)) == pytest.approx(1.0)
    # 1-sqrt decay over the last 20 steps: at progress p, lr = 0.1 + 0.9 (1 - sqrt(p))
    assert float(wsd(85)) == pytest.approx(0.1 + 0.9 * (1 - np.sqrt(0.25)), rel=1e-5)
    assert float(wsd(100)) == pytest.approx(0.1)
    cos = lr_schedule(dataclasses.replace(o, schedule="cosine"), 110)
    assert float(cos(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)


def test_param_groups():
    cfg = _cfg()
    graphdef, params, _ = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param, ...)
    groups = param_groups(nnx.to_pure_dict(params))
    assert groups["units"]["moe"]["mlp"]["gate"]["kernel"] == "router"
    assert groups["units"]["moe"]["input_layernorm"]["weight"] == "no_decay"
    assert groups["norm"]["weight"] == "no_decay"
    assert groups["units"]["moe"]["mlp"]["experts"]["gate_proj"] == "decay"


def _batch(cfg, accum, b=2, s=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.model.vocab_size, (accum, b, s + 1)).astype(np.int32)
    return {
        "input_ids": ids[..., :-1],
        "labels": ids[..., 1:],
        "loss_mask": np.ones((accum, b, s), np.float32),
        "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (accum, b, s)).copy(),
        "segment_ids": np.ones((accum, b, s), np.int32),
    }


def _step(cfg):
    tx = make_optimizer(cfg.optimizer, 10)
    mesh = build_mesh(cfg, jax.devices()[:1])
    graphdef, state = init_train_state(cfg, lambda rngs: build_model(cfg, rngs), tx, mesh)
    return jax.jit(make_train_step(graphdef, cfg, tx, lm_objective, 10)), state


def test_post_step_rules_bias_and_orthogonal_update():
    cfg = _cfg(
        "moe.bias_update_rate=0.01",
        "moe.orth_mode=decoupled",
        "moe.orth_loss_weight=0.5",
        "optimizer.learning_rate=0.0",
        "optimizer.warmup_steps=0",
    )
    step, state = _step(cfg)
    kernel0 = state["params"]["units"]["moe"]["mlp"]["gate"]["kernel"]
    new, metrics = step(state, _batch(cfg, 1))
    bias = np.asarray(new["buffers"]["units"]["moe"]["mlp"]["gate"]["correction_bias"])
    mags = np.abs(bias).ravel()
    assert np.all(np.isclose(mags, 0.0) | np.isclose(mags, 0.01)) and mags.max() == pytest.approx(0.01)
    # lr 0: the router moved only by the decoupled orthogonal step
    expected = router_losses.orthogonal_update(kernel0, 0.5)
    np.testing.assert_allclose(new["params"]["units"]["moe"]["mlp"]["gate"]["kernel"], expected, atol=1e-6)
    assert int(new["step"]) == 1 and "expert_load_cv" in metrics


@pytest.mark.slow
def test_accumulating_identical_microbatches_equals_one():
    cfg1 = _cfg("moe.bias_update_rate=0", "optimizer.grad_accum_steps=1")
    cfg2 = _cfg("moe.bias_update_rate=0", "optimizer.grad_accum_steps=2")
    b = _batch(cfg1, 1)
    step1, s1 = _step(cfg1)
    step2, s2 = _step(cfg2)
    n1, m1 = step1(s1, b)
    n2, m2 = step2(s2, jax.tree.map(lambda x: np.concatenate([x, x]), b))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, c in zip(jax.tree.leaves(n1["params"]), jax.tree.leaves(n2["params"])):
        np.testing.assert_allclose(a, c, atol=1e-6)


def test_objective_pieces_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (2, 5))
    lse = np.log(np.exp(logits).sum(-1))
    ref = lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), ref, rtol=1e-5)
    # MTP depth 1 at t predicts labels[t+1] and needs mask[t] and mask[t+1]
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    out = ModelOutput(logits=None, router_losses={}, mtp_logits=jnp.asarray(logits)[None])
    got = mtp_loss(mtp_token_nll(out, jnp.asarray(labels)), jnp.asarray(mask))
    shifted = np.pad(labels[:, 1:], ((0, 0), (0, 1)))
    ce = lse - np.take_along_axis(logits, shifted[..., None], -1)[..., 0]
    valid = mask * np.pad(mask[:, 1:], ((0, 0), (0, 1)))
    np.testing.assert_allclose(got, (ce * valid).sum() / valid.sum(), rtol=1e-5)


def test_non_finite_step_changes_nothing():
    """A step whose loss is NaN (its labels' mask is NaN) leaves params, optimizer state and the
    routing biases bitwise as they were, reports skipped=1 and zeroed metrics; the next finite
    step updates as usual."""
    cfg = _cfg("moe.bias_update_rate=0.01", "optimizer.warmup_steps=0")
    step, state = _step(cfg)
    before = jax.tree.map(np.asarray, state)
    bad = _batch(cfg, 1)
    bad["loss_mask"] = bad["loss_mask"] * np.nan
    after, metrics = step(jax.tree.map(jnp.asarray, state), bad)
    assert int(after["step"]) == int(before["step"]) + 1 and float(metrics["skipped"]) == 1.0
    for key in ("params", "buffers", "opt_state"):
        for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key])):
            np.testing.assert_array_equal(a, b)
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    good, metrics = step(after, _batch(cfg, 1))
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(before["params"]), jax.tree.leaves(jax.tree.map(np.asarray, good["params"]))
        )
    ]
    assert any(moved)


def test_eval_without_target_tokens_reports_no_loss():
    from ernie_jax.trainers.evaluation import describe_eval, evaluate

    empty = evaluate(lambda state, batch: {"lm_loss": 0.0, "tokens": 0.0}, None, lambda: iter([{}, {}]), 4)
    assert empty == {"eval_tokens": 0.0}
    assert "no target tokens" in describe_eval(empty) and "loss" not in describe_eval(empty).split("(")[0]
    some = evaluate(
        lambda state, batch: {"lm_loss": batch["l"], "tokens": batch["n"]},
        None,
        lambda: iter([{"l": 2.0, "n": 3.0}, {"l": 4.0, "n": 1.0}]),
        4,
    )
    assert some["eval_loss"] == pytest.approx(2.5) and some["eval_tokens"] == 4.0
    assert describe_eval(some).startswith("loss 2.5000  ppl 12.18")


def test_eval_means_are_weighted_by_the_reports_weights():
    from ernie_jax.trainers.dpo import DPO_EVAL
    from ernie_jax.trainers.evaluation import evaluate

    batches = [
        {"dpo_loss": 1.0, "reward_accuracy": 1.0, "pairs": 3.0, "lm_loss": 2.0, "tokens": 10.0},
        {"dpo_loss": 3.0, "reward_accuracy": 0.0, "pairs": 1.0, "lm_loss": 4.0, "tokens": 30.0},
    ]
    for b in batches:
        b.update(reward_margin=b["dpo_loss"], reward_chosen=0.0, reward_rejected=0.0)
    ev = evaluate(lambda state, b: b, None, lambda: iter(batches), 4, DPO_EVAL)
    assert ev["eval_loss"] == pytest.approx(1.5) and ev["eval_pairs"] == 4.0  # (3 x 1 + 1 x 3) / 4
    assert ev["eval_reward_accuracy"] == pytest.approx(0.75) and ev["eval_lm_loss"] == pytest.approx(3.5)
    assert "eval_ppl" not in ev
