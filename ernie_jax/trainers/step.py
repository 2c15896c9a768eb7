"""The jitted train and eval steps: pure (state, batch) -> (state, metrics).

A batch holds `grad_accum_steps` micro-batches on a leading axis [A, B, S]; they go through a
scan, gradients are averaged, one optimizer update follows, then the non-optimizer rules run:
the aux-loss-free correction-bias update and the decoupled orthogonal router step.

A step whose loss, gradients or updates are not finite changes nothing (params, optimizer state,
routing biases and FP8 histories stay as they were; the step counter and the data move on): its
metrics read 0 with `skipped` 1, and the loop counts and stops on a run of them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ernie_jax.config import Config
from ernie_jax.model import router_losses
from ernie_jax.model.ernie_vl import vision_token_ids
from ernie_jax.model.lora import with_dropout_seeds
from ernie_jax.model.param_parts import ROUTER_PATH, ROUTERS, param_part
from ernie_jax.precision.fp8 import update_histories
from ernie_jax.trainers.pipeline_grad import one_f_one_b_value_and_grad
from ernie_jax.trainers.state import TrainState, lr_schedule

Objective = Callable[[Any, dict, Config], tuple[jax.Array, dict]]
BatchInputs = Callable[[Callable, TrainState, dict], dict]


def _forward(graphdef, params, buffers, base, batch):
    """The model's outputs on `batch`; `base`: the frozen weights of a LoRA run, else {}."""
    model = nnx.merge(graphdef, params, buffers, *((base,) if base else ()))
    return model.apply_batch(batch)


def load_statistics(load: jax.Array) -> dict:
    """Per-MoE-layer expert load [L, E] -> min/max over the mean and coefficient of variation, each [L]."""
    mean = jnp.maximum(load.mean(-1), 1e-9)
    return {
        "expert_load_min": load.min(-1) / mean,
        "expert_load_max": load.max(-1) / mean,
        "expert_load_cv": load.std(-1) / mean,
    }


def _post_step_rules(cfg: Config, params: dict, buffers: dict, loads: dict) -> tuple[dict, dict]:
    """Rules outside the optimizer, per router (text, and vision in VL layers): correction-bias
    balancing and the decoupled orthogonal step. A frozen part's routers are left alone."""
    e = cfg.moe
    # under LoRA the routers are part of the frozen base: a bias moved here would be lost on export
    if not loads or cfg.lora.enabled or ROUTER_PATH[0] not in params:
        return params, buffers
    for name in ROUTERS:
        path = ROUTER_PATH + (name,)
        if (
            name not in loads
            or name not in _get(params, ROUTER_PATH)
            or param_part(path + ("kernel",)).freeze_group in cfg.train.freeze
        ):
            continue
        groups = e.top_k if e.group_orthogonal and name == "gate" else 1  # grouped orthogonality: text only
        if e.orth_mode == "decoupled" and e.orth_loss_weight > 0:
            kernel = _get(params, path + ("kernel",))
            params = _replace(
                params,
                path + ("kernel",),
                router_losses.orthogonal_update(kernel, e.orth_loss_weight, groups),
            )
        if e.bias_update_rate > 0:
            bias = _get(buffers, path + ("correction_bias",))
            buffers = _replace(
                buffers,
                path + ("correction_bias",),
                router_losses.correction_bias_update(bias, loads[name], e.bias_update_rate),
            )
    return params, buffers


def _has_fp8_meta(buffers: dict) -> bool:
    return any("fp8_meta" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(buffers))


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def _detach_language_model(grads: dict, batch: dict, cfg: Config) -> dict:
    """modality_detach: a micro-batch holding vision tokens trains only ViT, adapter and vision experts."""
    has_vision = jnp.any(jnp.isin(batch["input_ids"], jnp.asarray(vision_token_ids(cfg.vision))))
    return jax.tree_util.tree_map_with_path(
        lambda p, g: (
            jnp.where(has_vision, jnp.zeros_like(g), g)
            if param_part(p).freeze_group == "language_model"
            else g
        ),
        grads,
    )


def _replace(tree: dict, path: tuple, value) -> dict:
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def _where(keep_new: jax.Array, new, old):
    """`new` where `keep_new`, else `old`, leaf by leaf (a skipped step leaves the state as it was)."""
    return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)


def make_train_step(
    graphdef,
    cfg: Config,
    tx: optax.GradientTransformation,
    objective: Objective,
    total_steps: int,
    batch_inputs: BatchInputs | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`batch_inputs(forward, state, micro)`: the task's extra inputs from the state (trainers/task.py)."""
    schedule = lr_schedule(cfg.optimizer, total_steps)
    one_f_one_b = cfg.pipeline.schedule == "1f1b" and cfg.mesh.pipeline > 1

    def loss_fn(params, buffers, base, micro):
        out = _forward(graphdef, params, buffers, base, micro)
        loss, metrics = objective(out, micro, cfg)
        return loss, (metrics, out.loads())

    def with_task_inputs(state, buffers, micro):
        if batch_inputs is None:
            return micro
        base = state.get("base", {})
        return batch_inputs(lambda params, b: _forward(graphdef, params, buffers, base, b), state, micro)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        params, buffers, base = state["params"], state["buffers"], state.get("base", {})

        def dropout_keys(buffers, micro_index):
            """LoRA dropout: this step's and micro-batch's masks (the state keeps the seeds at zero)."""
            if not cfg.lora.enabled or not cfg.lora.dropout:
                return buffers
            key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
            return with_dropout_seeds(buffers, jax.random.fold_in(key, micro_index))

        # delayed-scaling FP8: differentiate w.r.t. the buffers too; the amax histories' cotangents
        # carry this step's amaxes (max over micro-batches), rolled in after the update
        fp8_state = _has_fp8_meta(buffers)
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1) if fp8_state else 0, has_aux=True)
        if one_f_one_b:  # the pipelined stack's backward interleaved with its forward (no FP8 state)
            grad_fn = one_f_one_b_value_and_grad(graphdef, cfg, objective)

        def micro_step(acc, xs):
            micro, i = xs
            micro = with_task_inputs(state, buffers, micro)  # a task's reference pass: no dropout
            (loss, (metrics, load)), grads = grad_fn(params, dropout_keys(buffers, i), base, micro)
            grads, amax = grads if fp8_state else (grads, None)
            if cfg.train.modality_detach:
                grads = _detach_language_model(grads, micro, cfg)
            acc_loss, acc_grads, acc_metrics, acc_load, acc_amax = acc
            summed = jax.tree.map(
                jnp.add, (acc_loss, acc_grads, acc_metrics, acc_load), (loss, grads, metrics, load)
            )
            amax = None if amax is None else jax.tree.map(jnp.maximum, acc_amax, amax)
            return (*summed, amax), None

        first = with_task_inputs(state, buffers, jax.tree.map(lambda x: x[0], batch))
        (loss_shape, (metrics_shape, load_shape)), grads_shape = jax.eval_shape(
            grad_fn, params, buffers, base, first
        )
        grads_shape, amax_shape = grads_shape if fp8_state else (grads_shape, None)
        zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            (loss_shape, grads_shape, metrics_shape, load_shape, amax_shape),
        )
        n = batch["input_ids"].shape[0]
        (loss, grads, metrics, load, amax), _ = jax.lax.scan(micro_step, zeros, (batch, jnp.arange(n)))
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = {k: (v if k == "tokens" else v / n) for k, v in metrics.items()}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_params, new_buffers = _post_step_rules(cfg, new_params, buffers, load)
        if fp8_state:
            new_buffers = update_histories(new_buffers, amax)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = schedule(state["step"])
        if "gate" in load:
            metrics.update(load_statistics(load["gate"]))
        if "vision_gate" in load:
            metrics.update({"vision_" + k: v for k, v in load_statistics(load["vision_gate"]).items()})
        finite = (
            jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) & jnp.isfinite(optax.tree.norm(updates))
        )
        params, buffers, opt_state = _where(
            finite, (new_params, new_buffers, opt_state), (params, buffers, state["opt_state"])
        )
        metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
        metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
        new_state = {
            **state,
            "step": state["step"] + 1,
            "params": params,
            "buffers": buffers,
            "opt_state": opt_state,
        }
        return new_state, metrics

    return step


def make_eval_step(
    graphdef,
    cfg: Config,
    objective: Objective,
    batch_inputs: BatchInputs | None = None,
    keys: tuple[str, ...] = ("lm_loss", "tokens"),
) -> Callable[[TrainState, dict], dict]:
    """The objective's metrics named in `keys` (what the task's EvalReport summarises) on one batch."""

    def step(state: TrainState, batch: dict) -> dict:
        base = state.get("base", {})
        if batch_inputs is not None:
            batch = batch_inputs(
                lambda params, b: _forward(graphdef, params, state["buffers"], base, b), state, batch
            )
        out = _forward(graphdef, state["params"], state["buffers"], base, batch)
        _, metrics = objective(out, batch, cfg)
        return {k: metrics[k] for k in keys}

    return step
