"""Multi-stage pretraining (the ERNIE 4.5 Technical Report's recipe, Baidu 2025) as a sequence of
runs of the shared loop.

`stages:` in the config lists the stages; each runs `stage_config(cfg, stage)` in its own
sub-workdir `<workdir>/<k>_<name>/` (checkpoints, resumable), logs into the top-level
metrics.jsonl with `stage` on every line and a continuing step count, and starts from the previous
stage's final params and routing biases (`checkpoint.init_from` = the previous sub-workdir; for a
LoRA stage after a LoRA stage, `lora.init_from` = the previous sub-workdir and the base stays). Params
the previous stage did not have (the ViT, adapter and vision experts when stage III switches the VL
model on) keep their fresh initialisation. A finished stage is skipped on restart, a stopped one
resumes, so a run killed anywhere (also right at a boundary) continues where it was.

Mixtures (`stages[i].mixture`) draw each step's batches from one source chosen with probability
proportional to its weight, from a seeded stream that depends only on the step (resumable). When a
stage has a text source, its held-out text loss is logged as `text_eval_loss`, so stages can be
compared on text (stages.json lists each stage's final value).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from ernie_jax.checkpoint.lock import WorkdirLock
from ernie_jax.config import Config, StageConfig, stage_config
from ernie_jax.checkpoint.manager import Checkpointer
from ernie_jax.paths import as_path, join, write_atomic
from ernie_jax.trainers.loop import run
from ernie_jax.trainers.startup import check_workdir
from ernie_jax.trainers.task import Task
from ernie_jax.trainers.eval_sources import with_eval_sources
from ernie_jax.trainers.tasks import TASKS, task_for

SUMMARY = "stages.json"


class MixtureIterator:
    """Micro-batches from several resumable iterators; one source per optimizer step."""

    def __init__(self, iters: list, weights: list[float], seed: int, accum: int):
        self.iters, self.seed, self.accum = iters, seed, accum
        self.p = np.asarray(weights, np.float64) / np.sum(weights)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        step = self.count // self.accum
        i = int(np.random.default_rng([self.seed, step]).choice(len(self.iters), p=self.p))
        self.count += 1
        return next(self.iters[i])

    def get_state(self) -> dict:
        return {"count": self.count, "sources": [it.get_state() for it in self.iters]}

    def set_state(self, state: dict) -> None:
        self.count = int(state["count"])
        for it, s in zip(self.iters, state["sources"]):
            it.set_state(s)


def mixture_task(cfg: Config, mixture) -> Task:
    tasks = []
    for src in mixture:
        sub = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, kind=src.kind, source=src.source))
        tasks.append(TASKS[src.kind](sub))
    it = MixtureIterator(
        [t.train_iter for t in tasks],
        [s.weight for s in mixture],
        cfg.data.shuffle_seed,
        cfg.optimizer.grad_accum_steps,
    )
    text = [t for t, s in zip(tasks, mixture) if s.kind == "text" and t.eval_batches is not None]
    mixed = next((t for t in tasks if t.eval_batches is not None), None)
    desc = "; ".join(f"{s.kind} x{s.weight:g}: {t.description}" for s, t in zip(mixture, tasks))
    stats = next((t.stats for t in tasks if t.stats is not None), None)
    task = Task(
        objective=tasks[0].objective,
        train_iter=it,
        eval_batches=mixed.eval_batches if mixed else None,
        vocab_size=max(t.vocab_size for t in tasks),
        description=desc,
        stats=stats,
        extra_evals={"text_eval": text[0].eval_batches} if text else {},
        tokenizer=tasks[0].tokenizer,
    )
    return with_eval_sources(cfg, task)


def _stage_dir(workdir: str, k: int, stage: StageConfig) -> str:
    return join(workdir, f"{k + 1}_{stage.name}")


def _finished(stage_dir: str, steps: int) -> bool:
    path = join(stage_dir, "checkpoints")
    return as_path(path).is_dir() and steps in Checkpointer(path, 1, False).steps()


def _read_summary(path: str) -> list:
    """Finished stages' results; an unreadable summary only means those stages report again."""
    try:
        rows = json.loads(as_path(path).read_text())
        return rows if isinstance(rows, list) else []
    except (OSError, ValueError):
        return []


def run_stages(cfg: Config, workdir: str, quiet: bool = False) -> list[dict]:
    """Run every stage in order; returns one result row per stage (also written to stages.json).
    The recipe holds its workdir (one metrics.jsonl for all stages), each stage its own."""
    check_workdir(workdir)
    with WorkdirLock(workdir):
        return _run_stages(cfg, workdir, quiet)


def _run_stages(cfg: Config, workdir: str, quiet: bool) -> list[dict]:
    summary_path = join(workdir, SUMMARY)
    results = _read_summary(summary_path)
    done = {r["stage"]: r for r in results}
    prev, offset, out = None, 0, []
    for k, stage in enumerate(cfg.stages):
        sdir = _stage_dir(workdir, k, stage)
        scfg = stage_config(cfg, stage)
        if prev is not None and scfg.lora.enabled and stage_config(cfg, cfg.stages[k - 1]).lora.enabled:
            # LoRA after LoRA: the adapters carry over; the base stays checkpoint.init_from's
            scfg = dataclasses.replace(scfg, lora=dataclasses.replace(scfg.lora, init_from=prev))
        elif prev is not None:
            scfg = dataclasses.replace(scfg, checkpoint=dataclasses.replace(scfg.checkpoint, init_from=prev))
        if _finished(sdir, stage.steps) and stage.name in done:
            out.append(done[stage.name])
        else:
            if not quiet:
                print(
                    f"== stage {k + 1}/{len(cfg.stages)}: {stage.name} ({stage.steps} steps) ==", flush=True
                )
            factory = (lambda c, m=stage.mixture: mixture_task(c, m)) if stage.mixture else task_for
            keep = prev if stage.optimizer_state == "keep" and prev is not None else None
            last = run(
                scfg,
                sdir,
                factory,
                quiet=quiet,
                log_dir=workdir,
                tags={"stage": stage.name},
                step_offset=offset,
                keep_optimizer_from=keep,
            )
            if last.get("stopped"):
                return out
            row = {
                "stage": stage.name,
                "steps": stage.steps,
                "end_step": offset + stage.steps,
                **{
                    k2: float(last[k2])
                    for k2 in ("eval_loss", "text_eval_loss", "lm_loss", "eval_accuracy", "eval_reward_mean")
                    if k2 in last
                },
            }
            if (
                "text_eval_loss" not in row
                and not stage.mixture
                and scfg.data.kind == "text"
                and "eval_loss" in row
            ):
                row["text_eval_loss"] = row["eval_loss"]
            out.append(row)
            results = [r for r in results if r["stage"] != stage.name] + [row]
            write_atomic(summary_path, json.dumps(results, indent=2))  # never a half-written summary
        prev, offset = sdir, offset + stage.steps
    if not quiet:
        for r in out:
            text = f"  text val loss {r['text_eval_loss']:.4f}" if "text_eval_loss" in r else ""
            if "eval_accuracy" in r:  # an RL stage: held-out accuracy of greedy answers
                print(f"stage {r['stage']:<14} held-out accuracy {r['eval_accuracy']:.4f}")
                continue
            loss = f"eval loss {r['eval_loss']:.4f}" if "eval_loss" in r else "(no eval split)"
            print(f"stage {r['stage']:<14} {loss}{text}")
    return out
