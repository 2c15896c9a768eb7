"""On-policy RL (GRPO / UPO): advantages, the objective against a direct transcription of its formula,
rewards and their failures, one-line errors, and a CLI run that logs rewards and resumes exactly, also
between the optimisation epochs of one rollout."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ernie_jax.config import load_config
from ernie_jax.data.prompts import Prompt, require_answers
from ernie_jax.errors import ConfigError, DataError
from ernie_jax.model import build_model
from ernie_jax.model.ernie import ModelOutput
from ernie_jax.parallel.mesh import build_mesh
from ernie_jax.trainers.rewards import RewardModel, answer_text
from ernie_jax.trainers.lm import token_nll
from ernie_jax.trainers.rl import MODEL_KEYS, best_and_worst, group_advantages, rl_objective, rl_task
from ernie_jax.trainers.state import model_of, split_model

BASE = ["data.kind=prompts", "data.batch_size=8", "rl.num_generations=4", "rl.prompts_per_step=2"]


def _cfg(*sets):
    return load_config("configs/tiny_dense.yaml", BASE + list(sets))


def test_group_advantages_and_pairs():
    r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5], np.float32)
    adv, filtered = group_advantages(r, 4, 1e-6)
    np.testing.assert_allclose(adv[:4], (r[:4] - 0.5) / (0.5 + 1e-6), rtol=1e-6)
    assert filtered.tolist() == [False] * 4 + [True] * 4 and not adv[4:].any()
    best, worst = best_and_worst(r, 4, filtered)
    assert best.tolist() == [1, 0, 0, 0, 0, 0, 0, 0] and worst.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]


def _reference_loss(logp, old, ref, mask, adv, filtered, best, worst, group, cfg):
    """GRPO/UPO loss written out per token and per group in numpy."""
    rl = cfg.rl
    total, n = 0.0, 0.0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t] or filtered[i]:
                continue
            ratio = np.exp(logp[i, t] - old[i, t])
            clipped = min(max(ratio, 1 - rl.clip_low), 1 + rl.clip_high)
            d = ref[i, t] - logp[i, t]
            total += -min(ratio * adv[i], clipped * adv[i]) + rl.kl_coef * (np.exp(d) - d - 1)
            n += 1
    loss = total / max(n, 1)
    margin = ((logp - ref) * mask).sum(1)
    terms = []
    for g in sorted(set(group.tolist())):
        rows = group == g
        if (best * rows).sum() == 0:
            continue
        z = (margin * best * rows).sum() - (margin * worst * rows).sum()
        terms.append(np.log1p(np.exp(-rl.upo_beta * z)))
    return loss + rl.upo_dpo_weight * (np.mean(terms) if terms else 0.0)


def test_objective_equals_the_formula():
    cfg = _cfg("rl.kl_coef=0.05", "rl.upo_dpo_weight=0.3", "rl.upo_beta=0.5", "rl.algorithm=upo")
    rng = np.random.default_rng(0)
    b, s = 8, 6
    logp = -rng.uniform(0.1, 3.0, (b, s)).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (b, s))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.5, (b, s))).astype(np.float32)
    mask = (rng.uniform(size=(b, s)) > 0.3).astype(np.float32)
    rewards = rng.uniform(size=b).astype(np.float32)
    adv, filtered = group_advantages(rewards, 4, 1e-6)
    best, worst = best_and_worst(rewards, 4, filtered)
    group = np.arange(b) // 4
    batch = {
        "labels": jnp.zeros((b, s), jnp.int32),
        "loss_mask": jnp.asarray(mask),
        "old_logp": jnp.asarray(old),
        "ref_logp": jnp.asarray(ref),
        "advantage": jnp.asarray(adv),
        "filtered": jnp.asarray(filtered, jnp.float32),
        "best": jnp.asarray(best),
        "worst": jnp.asarray(worst),
        "group": jnp.asarray(group),
        **{k: jnp.asarray(rewards) for k in ("reward", "correct", "response_length")},
        **{k: jnp.zeros(b) for k in ("reward_failures", "rollout_tokens_per_s")},
    }
    out = ModelOutput(logits=None, router_losses={}, label_nll=jnp.asarray(-logp))
    loss, metrics = rl_objective(out, batch, cfg)
    want = _reference_loss(logp, old, ref, mask, adv, filtered, best, worst, group, cfg)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert 0 < float(metrics["clip_fraction"]) < 1 and float(metrics["kl"]) > 0


def test_verifiers_user_functions_and_failures():
    cfg = _cfg("rl.reward=numeric", "rl.reward_tolerance=0.5", "rl.length_penalty=0.1", "rl.length_target=3")
    model = RewardModel(cfg)
    assert answer_text("<think>\nsum is 7\n</think>\n\n 7 ") == "7"
    s = model.score(
        ["q"] * 3, ["<think>x</think> 12.4", "12", "the answer is 11"], [{"answer": "12"}] * 3, [2, 5, 3]
    )
    assert s.correct == [1.0, 1.0, 0.0] and s.rewards == pytest.approx([1.0, 0.8, 0.0])
    exact = RewardModel(_cfg("rl.reward=exact"))
    own = {"answer": "x", "reward": {"type": "regex", "pattern": "[0-9]+"}}
    assert exact.score(["q"] * 2, ["12", "12"], [{"answer": "12"}, own], [1, 1]).rewards == [1.0, 1.0]
    probe = [{"text": "q", "answer": "1"}]
    with pytest.raises(ConfigError, match="must return one float per completion"):
        RewardModel(_cfg("rl.reward=tests.trainers.rl_reward_fns:wrong_shape"), probe)
    with pytest.raises(ConfigError, match="fails on the first prompts: RuntimeError"):
        RewardModel(_cfg("rl.reward=tests.trainers.rl_reward_fns:broken"), probe)
    with pytest.raises(ConfigError, match="cannot be imported"):
        RewardModel(_cfg("rl.reward=tests.trainers.nope:f"), probe)
    flaky = RewardModel(_cfg("rl.reward=tests.trainers.rl_reward_fns:flaky"), probe)  # call 1: the probe
    got = flaky.score(["q"] * 2, ["a", "b"], [{}, {}], [1, 1])  # call 2 fails: counted, scored 0
    assert (got.failures, got.rewards) == (2, [0.0, 0.0])
    assert flaky.score(["q"], ["a"], [{}], [1]).rewards == [0.5]


def test_bad_rl_settings_are_one_line():
    with pytest.raises(ConfigError, match="num_generations=1: group-relative"):
        _cfg("rl.num_generations=1", "rl.prompts_per_step=8")
    with pytest.raises(ConfigError, match="make them equal"):
        _cfg("rl.prompts_per_step=3")
    with pytest.raises(ConfigError, match="rl.reference=base needs adapters"):
        _cfg("rl.reference=base")
    with pytest.raises(ConfigError, match="package.module:function"):
        _cfg("rl.reward=not a path")
    prompts = [Prompt((1, 2), "q", {"prompt": "q"})]
    with pytest.raises(DataError, match='1 prompts .* have no "answer", which rl.reward=exact'):
        require_answers(prompts, "x.jsonl", "exact")


def _cli(workdir, *sets):
    cmd = [
        sys.executable,
        "-m",
        "ernie_jax.train",
        "--config",
        "configs/tiny_dense.yaml",
        "--workdir",
        str(workdir),
    ]
    for s in [
        *BASE,
        "model.num_layers=2",
        "data.seq_len=48",
        "rl.max_new_tokens=8",
        "rl.ppo_epochs=2",
        "rl.kl_coef=0.01",
        "log.interval=1",
        "train.eval_interval=4",
        "checkpoint.async_save=false",
        "optimizer.schedule=constant",  # the LR does not depend on train.steps: 3 + 1 steps = 4
        "optimizer.warmup_steps=0",
        *sets,
    ]:
        cmd += ["--set", s]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def test_cli_logs_rewards_and_resumes_exactly_inside_a_rollout(tmp_path):
    r = _cli(tmp_path / "a", "train.steps=4", "checkpoint.interval=4")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    train = [x for x in rows if "reward" in x]
    for key in (
        "reward",
        "reward_std",
        "reward_max",
        "correct",
        "filtered",
        "response_length",
        "clip_fraction",
        "kl",
    ):
        assert key in train[-1], key
    assert any("eval_accuracy" in x for x in rows)
    # steps 1-2 use rollout 0, 3-4 rollout 1; stop after step 3 and resume: step 4 reads rollout 1
    r = _cli(tmp_path / "b", "train.steps=3", "checkpoint.interval=3")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(tmp_path / "b", "train.steps=4", "checkpoint.interval=4")
    assert r.returncode == 0, r.stderr[-2000:]
    with ocp.StandardCheckpointer() as c:
        a = c.restore(str(tmp_path / "a" / "checkpoints" / "4" / "state"))["params"]
        b = c.restore(str(tmp_path / "b" / "checkpoints" / "4" / "state"))["params"]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_upo_recipe_raises_held_out_accuracy(tmp_path):
    """configs/upo_tiny.yaml from scratch: held-out accuracy rises by at least 15 points."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [
        sys.executable,
        "-m",
        "ernie_jax.train",
        "--config",
        "configs/upo_tiny.yaml",
        "--workdir",
        str(tmp_path / "w"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    acc = [
        json.loads(x)["eval_accuracy"] for x in open(tmp_path / "w" / "metrics.jsonl") if "eval_accuracy" in x
    ]
    assert acc[-1] - acc[0] >= 0.15, acc


VL = [
    "data.kind=prompts",
    "data.source=embedded",  # rl/vl_prompts.jsonl: "Which digit is this?" on the embedded digits
    "data.batch_size=8",
    "data.seq_len=48",
    "data.max_patches=128",
    "rl.num_generations=4",
    "rl.prompts_per_step=2",
    "rl.max_new_tokens=8",
    "rl.reward=exact",
    "moe.dispatch=dropless",  # the sampler's dispatch: the two forwards agree to rounding
]


def test_vl_rollout_rows_give_the_sampled_tokens_the_samplers_logprobs():
    """Prompts with images on a VL model: the learner rows (placeholders, 3D positions continuing after
    the image, each micro-batch's patches and layout) score every sampled token as the sampler did."""
    cfg = load_config("configs/tiny_vl.yaml", VL)
    task = rl_task(cfg)
    assert "held out" in task.description and task.evaluate is not None
    graphdef, params, buffers, _ = split_model(build_model(cfg, nnx.Rngs(0)))
    state = {"step": 0, "params": params, "buffers": buffers}
    task.prepare(graphdef, state, build_mesh(cfg), None, True)
    batch = task.next_batch(state)
    assert batch["positions"].shape == (1, 8, 48, 3) and batch["patches"].shape[:2] == (1, 128)
    assert (batch["input_ids"] == cfg.vision.image_token_id).sum() == 8 * 4  # 56 x 56 digits: 4 tokens
    assert batch["row_valid"].sum() == 8 * 4 and np.abs(batch["patches"][0, : 8 * 16]).sum() > 0
    micro = {k: batch[k][0] for k in MODEL_KEYS if k in batch}
    logp = -np.asarray(token_nll(model_of(graphdef, state).apply_batch(micro), micro["labels"]))
    mask = batch["loss_mask"][0] > 0
    assert mask.sum() >= 8 and batch["response_length"].min() >= 1
    np.testing.assert_allclose(logp[mask], batch["sample_logp"][0][mask], atol=2e-4)
    # the objective reports the same agreement
    _, metrics = rl_objective(
        model_of(graphdef, state).apply_batch(micro), {k: v[0] for k, v in batch.items()}, cfg
    )
    assert float(metrics["sampler_logp_diff"]) < 2e-4


def test_vl_prompt_settings_are_one_line():
    with pytest.raises(ConfigError, match="data.max_patches=100 must be a positive multiple"):
        load_config("configs/tiny_vl.yaml", [*VL, "data.max_patches=100"])


@pytest.mark.slow
def test_vl_cli_run_with_epochs_reference_and_eval(tmp_path):
    """The CLI on a VL model: two epochs over one rollout (the sampling-time log-probs from the
    training forward with the vision arrays), the KL reference, held-out accuracy."""
    sets = [*VL, "rl.ppo_epochs=2", "rl.kl_coef=0.01", "train.steps=2", "train.eval_interval=2"]
    sets += ["log.interval=1", "checkpoint.async_save=false"]
    cmd = [sys.executable, "-m", "ernie_jax.train", "--config", "configs/tiny_vl.yaml"]
    cmd += ["--workdir", str(tmp_path / "w")] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in open(tmp_path / "w" / "metrics.jsonl")]
    train = [x for x in rows if "reward" in x]
    assert len(train) == 2 and all(np.isfinite(x["loss"]) and "kl" in x for x in train)
    assert train[0]["sampler_logp_diff"] < 1e-3  # epoch 1: the sampling params
    assert any("eval_accuracy" in x for x in rows)
