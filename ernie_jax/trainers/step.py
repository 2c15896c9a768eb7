"""The jitted train and eval steps: pure (state, batch) -> (state, metrics).

A batch holds `grad_accum_steps` micro-batches on a leading axis [A, B, S]; they go through a
scan, gradients are averaged, one optimizer update follows, then the non-optimizer rules run:
the aux-loss-free correction-bias update and the decoupled orthogonal router step.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ernie_jax.config import Config
from ernie_jax.model import router_losses
from ernie_jax.trainers.state import TrainState, lr_schedule

Objective = Callable[[Any, dict, Config], tuple[jax.Array, dict]]


def _forward(graphdef, params, buffers, batch):
    model = nnx.merge(graphdef, params, buffers)
    return model.apply_batch(batch)


def load_statistics(load: jax.Array) -> dict:
    """Per-MoE-layer expert load [L, E] -> min/max over the mean and coefficient of variation, each [L]."""
    mean = jnp.maximum(load.mean(-1), 1e-9)
    return {"expert_load_min": load.min(-1) / mean, "expert_load_max": load.max(-1) / mean,
            "expert_load_cv": load.std(-1) / mean}


def _post_step_rules(cfg: Config, params: dict, buffers: dict, load) -> tuple[dict, dict]:
    """Rules outside the optimizer: correction-bias balancing and the decoupled orthogonal step."""
    e = cfg.moe
    if load is None or "units" not in params:
        return params, buffers
    gate = params["units"]["moe"]["mlp"]["gate"]
    if e.orth_mode == "decoupled" and e.orth_loss_weight > 0:
        groups = e.top_k if e.group_orthogonal else 1
        gate = {**gate, "kernel": router_losses.orthogonal_update(gate["kernel"], e.orth_loss_weight, groups)}
        params = _replace(params, ("units", "moe", "mlp", "gate"), gate)
    if e.bias_update_rate > 0:
        bias = buffers["units"]["moe"]["mlp"]["gate"]["correction_bias"]
        new_bias = router_losses.correction_bias_update(bias, load, e.bias_update_rate)
        buffers = _replace(buffers, ("units", "moe", "mlp", "gate", "correction_bias"), new_bias)
    return params, buffers


def _replace(tree: dict, path: tuple, value) -> dict:
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def make_train_step(graphdef, cfg: Config, tx: optax.GradientTransformation, objective: Objective,
                    total_steps: int) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    schedule = lr_schedule(cfg.optimizer, total_steps)

    def loss_fn(params, buffers, micro):
        out = _forward(graphdef, params, buffers, micro)
        loss, metrics = objective(out, micro, cfg)
        return loss, (metrics, out.expert_load)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        params, buffers = state["params"], state["buffers"]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_step(acc, micro):
            (_, (metrics, load)), grads = grad_fn(params, buffers, micro)
            return jax.tree.map(jnp.add, acc, (grads, metrics, load)), None

        first = jax.tree.map(lambda x: x[0], batch)
        (_, (metrics_shape, load_shape)), grads_shape = jax.eval_shape(grad_fn, params, buffers, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape, load_shape))
        (grads, metrics, load), _ = jax.lax.scan(micro_step, zeros, batch)
        n = batch["input_ids"].shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = {k: (v if k == "tokens" else v / n) for k, v in metrics.items()}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        params, buffers = _post_step_rules(cfg, params, buffers, load)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state["step"])
        if load is not None:
            metrics.update(load_statistics(load))
        new_state = {**state, "step": state["step"] + 1, "params": params, "buffers": buffers,
                     "opt_state": opt_state}
        return new_state, metrics

    return step


def make_eval_step(graphdef, cfg: Config, objective: Objective) -> Callable[[TrainState, dict], dict]:
    def step(state: TrainState, batch: dict) -> dict:
        out = _forward(graphdef, state["params"], state["buffers"], batch)
        _, metrics = objective(out, batch, cfg)
        return {"lm_loss": metrics["lm_loss"], "tokens": metrics["tokens"]}
    return step
