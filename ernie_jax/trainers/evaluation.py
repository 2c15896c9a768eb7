"""Eval passes: the task's eval split and its extra evals, token-weighted loss and perplexity."""

from __future__ import annotations

import math
from typing import Callable, Iterator

import jax

from ernie_jax.parallel.mesh import place_batch
from ernie_jax.trainers.task import Task


def describe_eval(ev: dict) -> str:
    """The console text of one eval: loss and perplexity, extra evals, or why there is none."""
    if "eval_loss" not in ev:
        return (
            "no target tokens in the eval batches (every eval sample is masked out), nothing to score; "
            "check the eval data or set data.eval_fraction=0"
        )
    extras = "".join(f"  {k} {v:.4f}" for k, v in ev.items() if k.endswith("_loss") and k != "eval_loss")
    return f"loss {ev['eval_loss']:.4f}  ppl {ev['eval_ppl']:.2f}{extras}"


def evaluate_task(eval_step, state, task: Task, mesh, steps: int) -> dict:
    """The task's eval split (eval_loss, eval_ppl, eval_tokens) plus each extra eval as `<name>_loss`;
    a split without target tokens reports only its eval_tokens = 0 (a loss of 0 would be a lie)."""

    def placed(batches):
        return lambda: (place_batch(b, mesh, 0) for b in batches())

    ev = evaluate(eval_step, state, placed(task.eval_batches), steps)
    for name, batches in task.extra_evals.items():
        extra = evaluate(eval_step, state, placed(batches), steps)
        if "eval_loss" in extra:
            ev[f"{name}_loss"] = extra["eval_loss"]
    return ev


def evaluate(eval_step, state, eval_batches: Callable[[], Iterator], steps: int) -> dict:
    total, tokens = 0.0, 0.0
    it = eval_batches()
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            break
        m = jax.device_get(eval_step(state, batch))
        total += float(m["lm_loss"]) * float(m["tokens"])
        tokens += float(m["tokens"])
    if tokens == 0:
        return {"eval_tokens": 0.0}
    loss = total / tokens
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": tokens}
