"""On-policy RL on the shared loop: GRPO and UPO (`data.kind: prompts`, `rl.*`).

Each rollout takes `rl.prompts_per_step` prompts, samples `rl.num_generations` answers per prompt
from the current params (the generation API: one compiled program, reused every rollout), scores them
on the host (trainers/rewards.py) and turns them into one step's batch: every row is prompt + answer,
the loss on the answer tokens, a group's rows in one micro-batch. The objective is the clipped
importance-ratio policy gradient with group-relative advantages (GRPO, Shao et al. 2024:
A = (r - mean_group) / (std_group + eps), ratio clipped to [1 - clip_low, 1 + clip_high] as in
DAPO, per-token mean over all answer tokens), plus `kl_coef` x the k3 estimator of KL(policy || ref),
k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman 2020). UPO (ERNIE 4.5 report: policy gradient
plus a DPO term on pairs from the same rollouts) adds `upo_dpo_weight` x the sigmoid DPO loss on
each group's best vs worst answer. Groups whose reward spread is below `min_reward_std` (all right,
all wrong, near-equal) carry no gradient and are counted.

`rl.ppo_epochs` optimisation steps reuse one rollout; its log-probs at sampling time (the old policy,
the training forward) ride in the batch. The prompts and the sampling seed of rollout k depend only
on k and train.seed, and each rollout is written to <workdir>/rollout.npz before its first step, so a
run resumed anywhere (also between the epochs of one rollout) continues exactly.
"""

from __future__ import annotations

import io
import time

import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax.config import Config
from ernie_jax.data.chat import end_ids
from ernie_jax.data.multimodal import VISION_KEYS, vision_arrays
from ernie_jax.data.prompts import (
    EMBEDDED_PROMPTS,
    EMBEDDED_PROMPTS_EVAL,
    EMBEDDED_VL_PROMPTS,
    EMBEDDED_VL_PROMPTS_EVAL,
    Prompt,
    read_prompts,
    require_answers,
    vision_arguments,
)
from ernie_jax.data.tokenizer import Tokenizer
from ernie_jax.errors import CheckpointError
from ernie_jax.generation import generate, pad_prompts
from ernie_jax.model.ernie import router_loss_total
from ernie_jax.parallel.mesh import place_batch
from ernie_jax.paths import as_path, join, write_atomic
from ernie_jax.trainers.dpo import reference_logps
from ernie_jax.trainers.lm import token_nll
from ernie_jax.trainers.rewards import BUILT_IN, RewardModel
from ernie_jax.trainers.state import model_of
from ernie_jax.trainers.task import EvalReport, Task

ROLLOUT_FILE = "rollout.npz"
# per-row rollout values the objective turns into metrics (means over rows)
ROW_METRICS = ("reward", "correct", "response_length", "filtered", "reward_failures", "rollout_tokens_per_s")
# what the model reads of a learner batch (the rest are rollout values for the objective)
MODEL_KEYS = ("input_ids", "labels", "segment_ids", "positions", *VISION_KEYS)


# ----------------------------------------------------------------------------- objective


def group_advantages(rewards: np.ndarray, group_size: int, min_std: float) -> tuple[np.ndarray, np.ndarray]:
    """rewards [N] in groups of `group_size` -> (advantages [N], filtered [N] bool): (r - mean) /
    (std + 1e-6) per group, 0 for groups whose std is below `min_std`."""
    r = rewards.reshape(-1, group_size)
    std = r.std(axis=1, keepdims=True)
    adv = (r - r.mean(axis=1, keepdims=True)) / (std + 1e-6)
    filtered = np.broadcast_to(std < max(min_std, 1e-12), r.shape)
    return np.where(filtered, 0.0, adv).reshape(-1).astype(np.float32), filtered.reshape(-1)


def best_and_worst(
    rewards: np.ndarray, group_size: int, filtered: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One-hot [N] masks of each kept group's highest- and lowest-reward answer (UPO's DPO pair)."""
    r = rewards.reshape(-1, group_size)
    best, worst = np.zeros_like(r), np.zeros_like(r)
    rows = np.arange(r.shape[0])
    best[rows, r.argmax(1)] = 1.0
    worst[rows, r.argmin(1)] = 1.0
    keep = ~filtered.reshape(-1, group_size)[:, :1]
    return (best * keep).reshape(-1).astype(np.float32), (worst * keep).reshape(-1).astype(np.float32)


def rl_objective(out, batch: dict, cfg: Config) -> tuple[jax.Array, dict]:
    rl = cfg.rl
    logp = -token_nll(out, batch["labels"])  # [B, S] log p of each next token
    mask = batch["loss_mask"].astype(jnp.float32)
    kept = mask * (1.0 - batch["filtered"][:, None])
    old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    ratio = jnp.exp(logp - old)
    adv = batch["advantage"][:, None]
    clipped = jnp.clip(ratio, 1.0 - rl.clip_low, 1.0 + rl.clip_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    tokens = jnp.maximum(kept.sum(), 1.0)
    mean = lambda v: jnp.sum(v * kept) / tokens
    metrics = {
        "pg_loss": mean(pg),
        "clip_fraction": mean((jnp.abs(ratio - clipped) > 0).astype(jnp.float32)),
        # a Monte-Carlo estimate: the mean surprisal of the sampled answer tokens
        "entropy": jnp.sum(-logp * mask) / jnp.maximum(mask.sum(), 1.0),
        "tokens": mask.sum(),
    }
    if "sample_logp" in batch:
        # sampler vs learner: at a rollout's first epoch the same params, so ~0 unless the two forwards
        # disagree (dispatch, precision, positions); later epochs add the update's change
        gap = jnp.abs(logp - batch["sample_logp"]) * mask
        metrics["sampler_logp_diff"] = jnp.sum(gap) / jnp.maximum(mask.sum(), 1.0)
    loss = metrics["pg_loss"]
    if "ref_logp" in batch:
        delta = batch["ref_logp"] - logp
        kl = jnp.exp(delta) - delta - 1.0
        metrics["kl"] = mean(kl)
        loss = loss + rl.kl_coef * metrics["kl"]
    if rl.algorithm == "upo":
        metrics["upo_dpo_loss"] = _pair_loss(logp, mask, batch, rl.upo_beta)
        loss = loss + rl.upo_dpo_weight * metrics["upo_dpo_loss"]
    if out.router_losses:
        loss = loss + router_loss_total(out, cfg.moe)
    metrics["loss"] = loss
    metrics["lm_loss"] = metrics["entropy"]  # the answers' NLL under the policy (what the console shows)
    for k in ROW_METRICS:
        metrics[k] = jnp.mean(batch[k])
    metrics["reward_max"] = jnp.max(batch["reward"])
    metrics["reward_std"] = jnp.std(batch["reward"])
    return loss, metrics


def _pair_loss(logp, mask, batch, beta: float) -> jax.Array:
    """Mean over kept groups of -log sigmoid(beta z), z = margin(best) - margin(worst), margin =
    summed answer log-prob minus the reference's (DPO on each group's best vs worst answer)."""
    seq = jnp.sum(logp * mask, axis=-1)
    ref = jnp.sum(batch["ref_logp"] * mask, axis=-1) if "ref_logp" in batch else jax.lax.stop_gradient(seq)
    margin = seq - ref  # [B]
    groups = jax.nn.one_hot(batch["group"], margin.shape[0], dtype=margin.dtype)  # [row, group]
    z = (batch["best"] * margin) @ groups - (batch["worst"] * margin) @ groups  # [group]
    has = (batch["best"] @ groups) > 0
    terms = jnp.where(has, -jax.nn.log_sigmoid(beta * z), 0.0)
    return jnp.sum(terms) / jnp.maximum(jnp.sum(has), 1.0)


# ----------------------------------------------------------------------------- rollouts


def answers(model, prompts: list[Prompt], cfg: Config, mesh, tokenizer, ends, temperature: float, seed: int):
    """(generated, answer texts, answer lengths in tokens incl. the end token) for `prompts`. Prompts
    are right-padded to the longest a run allows (data.seq_len - rl.max_new_tokens), so every rollout
    and evaluation reuses one compiled generation program."""
    width = cfg.data.seq_len - cfg.rl.max_new_tokens
    ids, lens = pad_prompts([p.ids for p in prompts], cfg.model.pad_token_id, width)
    # VL: every row's patch share of a micro-batch, so any images reuse the one program
    vision = vision_arguments(prompts, len(prompts) * (cfg.data.max_patches // cfg.data.batch_size))
    with jax.set_mesh(mesh):
        got = generate(
            model,
            ids,
            prompt_lengths=lens,
            max_new_tokens=cfg.rl.max_new_tokens,
            temperature=temperature,
            top_p=cfg.rl.top_p,
            seed=seed,
            eos_token_ids=ends,
            **vision,
        )
    texts, lengths = [], []
    for i in range(len(prompts)):
        toks = got.tokens[i, : int(got.lengths[i])].tolist()
        lengths.append(len(toks))
        texts.append(tokenizer.decode(toks[:-1] if toks and toks[-1] in ends else toks))
    return got, texts, lengths


def _vision_batch(cfg: Config, rows: list[Prompt], accum: int, per_micro: int) -> dict:
    """The vision arrays [A, ...] of a learner batch: per micro-batch its rows' patches and layout."""
    v = cfg.vision
    dim, budget = 3 * v.patch_size**2, cfg.data.max_patches
    empty = (np.zeros((0, dim), np.float32), np.zeros((0, 4), np.int32))
    micro = [
        vision_arrays(
            [
                empty if p.vision is None else (p.vision.patches, p.vision.items)
                for p in rows[a * per_micro :][:per_micro]
            ],
            v.spatial_merge,
            budget,
            dim,
        )
        for a in range(accum)
    ]
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


class Rollouts:
    """The RL task's data: builds each step's batch from the current params (`next_batch`), and is
    its train_iter (get_state / set_state: the rollout index, for the record; everything else
    follows from the step)."""

    def __init__(self, cfg: Config, prompts: list[Prompt], tokenizer: Tokenizer, reward: RewardModel):
        self.cfg, self.prompts, self.tokenizer, self.reward = cfg, prompts, tokenizer, reward
        self.ends = end_ids(tokenizer, cfg.model.eos_token_id)
        self.graphdef = self.mesh = self.workdir = None
        self.cached: tuple[int, dict] | None = None
        self.rollout = 0
        self._logp = None

    def attach(self, graphdef, mesh, workdir: str) -> None:
        self.graphdef, self.mesh, self.workdir = graphdef, mesh, workdir

    def get_state(self) -> dict:
        return {"rollout": self.rollout}

    def set_state(self, state: dict) -> None:
        self.rollout = int(state.get("rollout", 0))

    def prompt_indices(self, k: int) -> np.ndarray:
        """Prompts of rollout k: a fresh permutation of the set per pass, seeded by train.seed."""
        n, p = len(self.prompts), self.cfg.rl.prompts_per_step
        out = []
        for i in range(k * p, (k + 1) * p):
            perm = np.random.default_rng([self.cfg.train.seed, i // n]).permutation(n)
            out.append(perm[i % n])
        return np.asarray(out)

    def next_batch(self, state: dict) -> dict:
        """The batch of the step after `state["step"]`: a new rollout every rl.ppo_epochs steps."""
        step = int(state["step"])
        k, epoch = divmod(step, self.cfg.rl.ppo_epochs)
        if self.cached is None or self.cached[0] != k:
            batch = self._read(k) if epoch else None
            if batch is None:
                batch = self._roll(state, k)
                self._write(k, batch)
            self.cached = (k, batch)
        self.rollout = k
        return self.cached[1]

    def _roll(self, state: dict, k: int) -> dict:
        cfg, rl = self.cfg, self.cfg.rl
        g, s = rl.num_generations, cfg.data.seq_len
        chosen = [self.prompts[i] for i in self.prompt_indices(k) for _ in range(g)]
        t0 = time.perf_counter()
        seed = int(np.random.default_rng([cfg.train.seed, k, 7]).integers(1 << 31))
        got, texts, lengths = answers(
            model_of(self.graphdef, state),
            chosen,
            cfg,
            self.mesh,
            self.tokenizer,
            self.ends,
            rl.temperature,
            seed,
        )
        seconds = time.perf_counter() - t0
        scores = self.reward.score([p.text for p in chosen], texts, [p.sample for p in chosen], lengths)
        rewards = np.asarray(scores.rewards, np.float32)
        adv, filtered = group_advantages(rewards, g, rl.min_reward_std)
        best, worst = best_and_worst(rewards, g, filtered)
        rows = len(chosen)
        ids = np.zeros((rows, s), np.int32)
        loss_mask = np.zeros((rows, s), np.float32)
        sample_logp = np.zeros((rows, s), np.float32)
        seg = np.zeros((rows, s), np.int32)
        vl = cfg.vision.enabled
        positions = np.zeros((rows, s, 3) if vl else (rows, s), np.int32)
        for i, p in enumerate(chosen):
            n, lp = lengths[i], len(p.ids)
            ids[i, :lp] = p.ids
            ids[i, lp : lp + n] = got.tokens[i, :n]
            seg[i, : lp + n] = 1
            loss_mask[i, lp - 1 : lp + n - 1] = 1.0  # position t predicts token t + 1: the answer
            sample_logp[i, lp - 1 : lp + n - 1] = got.logprobs[i, :n]
            # the prompt's positions (3D after images), the answer's where generation placed them
            prompt = np.arange(lp)[:, None] if p.vision is None else p.vision.positions
            answer = (p.next_position() + np.arange(n))[:, None]
            row = np.concatenate([np.broadcast_to(prompt, (lp, 3)), np.broadcast_to(answer, (n, 3))])
            positions[i, : lp + n] = row if vl else row[:, 0]
        labels = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
        per_micro = cfg.data.batch_size
        batch = {
            "input_ids": ids,
            "labels": labels,
            "loss_mask": loss_mask,
            "segment_ids": seg,
            "positions": positions,
            "sample_logp": sample_logp,
            "advantage": adv,
            "filtered": filtered.astype(np.float32),
            "best": best,
            "worst": worst,
            "group": (np.arange(rows) % per_micro) // g,
            "reward": rewards,
            "correct": np.asarray(
                scores.correct if scores.correct is not None else rewards >= 1.0, np.float32
            ),
            "response_length": np.asarray(lengths, np.float32),
            "reward_failures": np.full(rows, scores.failures, np.float32),
            "rollout_tokens_per_s": np.full(rows, sum(lengths) / max(seconds, 1e-9), np.float32),
        }
        a = rows // per_micro
        batch = {key: v.reshape(a, per_micro, *v.shape[1:]) for key, v in batch.items()}
        if vl:  # each micro-batch gathers its rows' patches, as the multimodal pipeline does
            batch.update(_vision_batch(cfg, chosen, a, per_micro))
        if rl.ppo_epochs > 1:  # the sampling policy's log-probs, from the training forward
            batch["old_logp"] = self._old_logp(state, batch)
        return batch

    def _old_logp(self, state: dict, batch: dict) -> np.ndarray:
        if self._logp is None:
            graphdef = self.graphdef

            @jax.jit
            def logp(state, micro):
                return -token_nll(model_of(graphdef, state).apply_batch(micro), micro["labels"])

            self._logp = logp
        out = []
        for a in range(batch["input_ids"].shape[0]):
            micro = {k: batch[k][a] for k in MODEL_KEYS if k in batch}
            with jax.set_mesh(self.mesh):
                out.append(np.asarray(jax.device_get(self._logp(state, place_batch(micro, self.mesh, 0)))))
        return np.stack(out).astype(np.float32)

    def _write(self, k: int, batch: dict) -> None:
        if jax.process_index() != 0 or self.workdir is None:
            return
        buf = io.BytesIO()
        np.savez(buf, rollout=np.int64(k), **batch)
        write_atomic(join(self.workdir, ROLLOUT_FILE), buf.getvalue())

    def _read(self, k: int) -> dict | None:
        """Rollout k as saved before its first step (a resume between its epochs), else None."""
        path = join(self.workdir, ROLLOUT_FILE) if self.workdir else None
        if path is None or not as_path(path).is_file():
            return None
        try:
            with np.load(io.BytesIO(as_path(path).read_bytes())) as f:
                if int(f["rollout"]) != k:
                    return None
                return {key: np.asarray(f[key]) for key in f.files if key != "rollout"}
        except Exception as e:  # noqa: BLE001 - any damage: say so, then sample again
            raise CheckpointError(
                f"{path} is damaged ({type(e).__name__}); delete it to sample rollout {k} again"
            ) from None


# ----------------------------------------------------------------------------- evaluation


class HeldOutAccuracy:
    """Greedy answers to the held-out prompts, scored by the run's reward: eval_accuracy (verifiable
    rewards) and eval_reward_mean."""

    def __init__(self, cfg: Config, prompts: list[Prompt], tokenizer: Tokenizer, reward: RewardModel):
        self.cfg, self.prompts, self.tokenizer, self.reward = cfg, prompts, tokenizer, reward
        self.ends = end_ids(tokenizer, cfg.model.eos_token_id)
        self.mesh = None

    def __call__(self, graphdef, state: dict) -> dict:
        b = self.cfg.data.batch_size
        rewards, correct = [], []
        model = model_of(graphdef, state)
        for start in range(0, len(self.prompts), b):
            chunk = self.prompts[start : start + b]
            full = chunk + [chunk[-1]] * (b - len(chunk))  # one batch shape: one compiled program
            _, texts, lengths = answers(model, full, self.cfg, self.mesh, self.tokenizer, self.ends, 0.0, 0)
            texts, lengths = texts[: len(chunk)], lengths[: len(chunk)]
            s = self.reward.score([p.text for p in chunk], texts, [p.sample for p in chunk], lengths)
            rewards += s.rewards
            correct += s.correct if s.correct is not None else []
        out = {"eval_reward_mean": float(np.mean(rewards)), "eval_prompts": float(len(rewards))}
        if correct:
            out["eval_accuracy"] = float(np.mean(correct))
        return out


# ----------------------------------------------------------------------------- the task


def rl_reference(state: dict) -> dict:
    """`rl.reference: copy`: a frozen copy of the starting params (the policy at step 0)."""
    return {"ref_params": jax.tree.map(jnp.copy, state["params"])}


def reference_inputs(forward, state: dict, micro: dict) -> dict:
    params = state["ref_params"] if "ref_params" in state else jax.tree.map(jnp.zeros_like, state["params"])
    return {**micro, "ref_logp": reference_logps(forward(jax.lax.stop_gradient(params), micro), micro)}


def rl_task(cfg: Config) -> Task:
    rl = cfg.rl
    tokenizer = Tokenizer(cfg.data.tokenizer)
    max_prompt = cfg.data.seq_len - rl.max_new_tokens
    vl = cfg.vision.enabled
    embedded = EMBEDDED_VL_PROMPTS if vl else EMBEDDED_PROMPTS
    read = lambda source, embedded: read_prompts(
        source, tokenizer, cfg.data.chat_mode, max_prompt, embedded=embedded, cfg=cfg
    )
    prompts, stats = read(cfg.data.source, embedded)
    eval_source = rl.eval_source or ("embedded" if cfg.data.source == "embedded" else "")
    held = (
        read(eval_source, EMBEDDED_VL_PROMPTS_EVAL if vl else EMBEDDED_PROMPTS_EVAL)[0] if eval_source else []
    )
    if rl.reward in BUILT_IN and rl.reward != "regex":
        require_answers(prompts, cfg.data.source, rl.reward)
        if held:
            require_answers(held, eval_source, rl.reward)
    reward = RewardModel(cfg, [{**p.sample, "text": p.text} for p in prompts])
    rollouts = Rollouts(cfg, prompts, tokenizer, reward)
    evaluate = HeldOutAccuracy(cfg, held, tokenizer, reward) if held else None
    needs_ref = rl.kl_coef > 0 or rl.algorithm == "upo"

    def prepare(graphdef, state, mesh, workdir, fresh):
        rollouts.attach(graphdef, mesh, workdir)
        if evaluate is not None:
            evaluate.mesh = mesh
        return {"train_iter": rollouts, "next_batch": rollouts.next_batch}

    return Task(
        objective=rl_objective,
        train_iter=rollouts,
        eval_batches=None,
        vocab_size=tokenizer.vocab_size,
        stats=stats,
        eval_report=EvalReport(),
        tokenizer=tokenizer,
        init_state=rl_reference if needs_ref and rl.reference == "copy" else None,
        batch_inputs=reference_inputs if needs_ref else None,
        prepare=prepare,
        next_batch=rollouts.next_batch,
        evaluate=evaluate,
        description=(
            f"prompts: {len(prompts)} ({stats.summary()}), {len(held)} held out; {rl.algorithm}, "
            f"{rl.prompts_per_step} prompts x {rl.num_generations} answers per rollout, reward {rl.reward}"
        ),
    )
