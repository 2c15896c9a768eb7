"""Eval passes: the task's eval split, its extra evals and the named held-out sources
(data.eval_source), each summarised as the task's `EvalReport` says (token-weighted loss,
perplexity and bits per byte for LM tasks; pair-weighted preference metrics for DPO)."""

from __future__ import annotations

import functools
import math
from typing import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from ernie_jax.parallel.mesh import place_batch
from ernie_jax.trainers.task import EvalReport, Task

LM_REPORT = EvalReport()


def describe_eval(ev: dict) -> str:
    """The console text of one eval: the task's metrics, extra evals and held-out sources, or why
    there is nothing to report."""
    parts = []
    if "eval_loss" in ev:
        main = f"loss {ev['eval_loss']:.4f}"
        main += f"  ppl {ev['eval_ppl']:.2f}" if "eval_ppl" in ev else ""
        main += f"  bpb {ev['eval_bpb']:.4f}" if "eval_bpb" in ev else ""
        skip = {"eval_loss", "eval_ppl", "eval_bpb", "eval_tokens", "eval_pairs"}
        main += "".join(
            f"  {k[5:]} {v:.4f}" for k, v in ev.items() if k.startswith("eval_") and k not in skip
        )
        main += "".join(f"  {k} {v:.4f}" for k, v in ev.items() if k.endswith("_loss") and k[:4] != "eval")
        parts.append(main)
    elif "eval_reward_mean" in ev:  # a task's own evaluation (RL: greedy answers to held-out prompts)
        parts.append("  ".join(f"{k[5:]} {v:.4f}" for k, v in ev.items() if k.startswith("eval_")))
    elif "eval_tokens" in ev or "eval_pairs" in ev:
        parts.append(
            "no target tokens in the eval batches (every eval sample is masked out), nothing to score; "
            "check the eval data or set data.eval_fraction=0"
        )
    for name in dict.fromkeys(k.split("/")[1] for k in ev if k.startswith("eval/")):
        got = {k.split("/")[2]: v for k, v in ev.items() if k.startswith(f"eval/{name}/")}
        if "loss" in got:
            bpb = f" bpb {got['bpb']:.4f}" if "bpb" in got else ""
            parts.append(f"{name}: loss {got['loss']:.4f} ppl {got['ppl']:.2f}{bpb}")
        else:
            parts.append(f"{name}: no target tokens")
    return " | ".join(parts)


def evaluate_task(eval_step, state, task: Task, mesh, steps: int) -> dict:
    """The task's eval split (eval_loss, ..., as its EvalReport says), each extra eval as
    `<name>_loss` and each held-out source as eval/<name>/loss, ppl, bpb, tokens (up to `steps`
    batches each); a split without target tokens reports only its weight (eval_tokens = 0)."""
    place = lambda b: place_batch(b, mesh, 0)
    count_bytes = None if task.tokenizer is None else functools.partial(scored_bytes, task.tokenizer)
    ev = {}
    if task.eval_batches is not None:
        report = task.eval_report
        ev = evaluate(
            eval_step,
            state,
            task.eval_batches,
            steps,
            report,
            count_bytes if report.per_token else None,
            place,
        )
    for name, batches in task.extra_evals.items():
        extra = evaluate(eval_step, state, batches, steps, place=place)
        if "eval_loss" in extra:
            ev[f"{name}_loss"] = extra["eval_loss"]
    for name, batches in task.eval_sources.items():
        scored = evaluate(eval_step, state, batches, steps, LM_REPORT, count_bytes, place)
        for key, value in scored.items():
            ev[f"eval/{name}/{key[5:]}"] = value
    return ev


def evaluate(
    eval_step,
    state,
    eval_batches: Callable[[], Iterator],
    steps: int,
    report: EvalReport = LM_REPORT,
    count_bytes: Callable[[dict], int] | None = None,
    place: Callable[[dict], dict] = lambda b: b,
) -> dict:
    """Up to `steps` batches through `eval_step`; each of the report's metrics as its weighted mean
    (eval_<name>), the report's loss as eval_loss (+ eval_ppl for a per-token loss, + eval_bpb: the
    summed NLL in bits over the UTF-8 bytes of the scored text, which `count_bytes(batch)` gives)."""
    weight_of = dict(report.means)
    sums = dict.fromkeys(weight_of, 0.0)
    weights = dict.fromkeys(weight_of, 0.0)
    total_bytes = 0.0
    it = eval_batches()
    for _ in range(steps):
        batch = next(it, None)
        if batch is None:
            break
        if count_bytes is not None:
            total_bytes += count_bytes(batch)
        m = jax.device_get(eval_step(state, place(batch)))
        for name, weight in report.means:
            sums[name] += float(m[name]) * float(m[weight])
            weights[name] += float(m[weight])
    if weights[report.loss] == 0:
        return {f"eval_{weight_of[report.loss]}": 0.0}
    loss = sums[report.loss] / weights[report.loss]
    out = {"eval_loss": loss}
    if report.per_token:
        out["eval_ppl"] = math.exp(min(loss, 50.0))
    if count_bytes is not None and report.per_token:
        if jax.process_count() > 1:  # each process saw its own rows of the global batches
            total_bytes = float(np.sum(multihost_utils.process_allgather(np.float64(total_bytes))))
        if total_bytes > 0:
            out["eval_bpb"] = sums[report.loss] / math.log(2) / total_bytes
    out[f"eval_{weight_of[report.loss]}"] = weights[report.loss]
    for name, _ in report.means:
        if name != report.loss and weights[name] > 0:
            out[f"eval_{name}"] = sums[name] / weights[name]
    return out


def scored_bytes(tokenizer, batch: dict) -> int:
    """UTF-8 bytes of the text the scored labels spell: each run of scored tokens in a row (a document
    or an answer; runs end at document boundaries, where the mask is 0) decoded on its own."""
    labels, mask = np.asarray(batch["labels"]), np.asarray(batch["loss_mask"]) > 0
    width = labels.shape[-1]
    total = 0
    for row, scored in zip(labels.reshape(-1, width), mask.reshape(-1, width)):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], scored.astype(np.int8), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            total += tokenizer.text_bytes(row[a:b])
    return total
