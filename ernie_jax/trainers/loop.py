"""The one training loop. `run` reads as the story of a run: open the task and the checkpoints,
check the settings, build or restore the state, compile, then step / log / eval / save until done.

Trainers plug in through `Task` (trainers/task.py: data, objective, hooks); the loop itself knows
nothing of the loss or of any trainer's extra state.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax.sharding import Mesh
import numpy as np

from ernie_jax.checkpoint.lock import WorkdirLock
from ernie_jax.checkpoint.manager import Checkpointer
from ernie_jax.config import Config, to_dict
from ernie_jax.errors import TrainingError, is_out_of_memory
from ernie_jax.metrics import Console, MetricsWriter, train_flops_per_token
from ernie_jax.parallel.mesh import build_mesh, place_batch
from ernie_jax.paths import as_path, join, shown
from ernie_jax.trainers.compiled import CompiledTrainStep, MeshJit, jit_train_step
from ernie_jax.trainers.evaluation import describe_eval, evaluate_task
from ernie_jax.trainers.guards import SkipCounter, StopFlag, all_finite, finish_saves
from ernie_jax.trainers.log_window import LogWindow
from ernie_jax.trainers.memory import out_of_memory
from ernie_jax.trainers.profiling import StepProfiler, use_compile_cache
from ernie_jax.trainers.samples import PromptSampler
from ernie_jax.trainers.startup import (
    announce,
    check_run_settings,
    check_vocab,
    check_workdir,
    open_checkpoints,
    starting_state,
)
from ernie_jax.trainers.state import checkpointed, make_optimizer
from ernie_jax.trainers.step import make_eval_step, make_train_step
from ernie_jax.trainers.task import Task

__all__ = ["run", "Loop"]


def run(
    cfg: Config,
    workdir: str,
    task_factory: Callable[[Config], Task],
    quiet: bool = False,
    log_dir: str | None = None,
    tags: dict | None = None,
    step_offset: int = 0,
    keep_optimizer_from: str | None = None,
) -> dict:
    """Train `cfg` in `workdir`; returns the last logged metrics (+ "stopped" when a signal ended it).
    Stages use `log_dir` (one metrics.jsonl for the whole recipe), `tags` (e.g. the stage name) and
    `step_offset` (logged steps continue across stages). One run at a time holds a workdir."""
    check_workdir(workdir)
    with WorkdirLock(workdir):
        console = Console(quiet)
        use_compile_cache(cfg.train.compile_cache)
        task = task_factory(cfg)
        check_vocab(task, cfg)
        sampler = PromptSampler(cfg, task.tokenizer) if cfg.log.sample_prompts else None
        ckpt = open_checkpoints(workdir, cfg)
        mesh = build_mesh(cfg)
        check_run_settings(cfg, mesh, jax.default_backend())
        tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.train.freeze, cfg.lora.lora_plus_ratio)
        start = starting_state(cfg, task, ckpt, tx, mesh, console, keep_optimizer_from)
        if task.prepare is not None:
            task = dataclasses.replace(
                task, **task.prepare(start.graphdef, start.state, mesh, workdir, fresh=not start.resumed)
            )
        if start.resumed:
            task.train_iter.set_state(start.data_state)
        peak = announce(cfg, task, mesh, workdir, log_dir, console)
        config = to_dict(cfg)
        train_step = jit_train_step(
            make_train_step(start.graphdef, cfg, tx, task.objective, cfg.train.steps, task.batch_inputs),
            start.state,
            mesh,
        )
        keys = task.eval_report.keys()
        eval_step = jax.jit(make_eval_step(start.graphdef, cfg, task.objective, task.batch_inputs, keys))
        loop = Loop(
            cfg,
            task,
            ckpt,
            mesh,
            console,
            train_step=CompiledTrainStep(train_step, cfg, jax.local_devices()[0], console.say),
            eval_step=MeshJit(eval_step, mesh),
            writer=MetricsWriter(
                log_dir or workdir,
                cfg.log,
                config=config,
                resume_step=step_offset + int(start.state["step"]),
                run_name=as_path(shown(workdir)).name,
            ),
            window=LogWindow(
                cfg.optimizer.grad_accum_steps * cfg.data.batch_size * cfg.data.seq_len,
                train_flops_per_token(cfg, cfg.data.seq_len),
                peak,
                len(jax.devices()),
            ),
            profiler=StepProfiler(cfg.train.profile_steps, join(workdir, "profile"), console.say),
            sampler=sampler,
            graphdef=start.graphdef,
            config_dict=config,
            tags=tags or {},
            step_offset=step_offset,
        )
        return loop.run(start.state)


@dataclasses.dataclass
class Loop:
    """Steps, log lines, evals and saves of one run, with the guards that keep it from being lost."""

    cfg: Config
    task: Task
    ckpt: Checkpointer
    mesh: Mesh
    console: Console
    train_step: CompiledTrainStep
    eval_step: MeshJit
    writer: MetricsWriter
    window: LogWindow
    profiler: StepProfiler
    sampler: PromptSampler | None  # log.sample_prompts, continued at every eval
    graphdef: object  # the model's structure (the state holds its arrays)
    config_dict: dict  # the resolved config, saved with every checkpoint
    tags: dict
    step_offset: int

    def __post_init__(self):
        self.skips = SkipCounter(self.cfg.train.max_skipped_steps)
        self.last: dict = {}
        t = self.task
        self.evals = (
            t.eval_batches is not None
            or bool(t.eval_sources)
            or self.sampler is not None
            or t.evaluate is not None
        )

    def run(self, state: dict) -> dict:
        cfg, task = self.cfg, self.task
        start = step = int(state["step"])
        try:
            if cfg.train.eval_at_start and self.evals and start == 0:
                self.eval(state, 0, note=" (the starting params)")
            with StopFlag() as flag:
                while step < cfg.train.steps and not flag.stop:
                    step += 1
                    self.profiler.before(step)
                    raw = (
                        task.next_batch(state)
                        if task.next_batch is not None
                        else _next_step_batch(task.train_iter, cfg.optimizer.grad_accum_steps)
                    )
                    batch = place_batch(raw, self.mesh, batch_dim=1)
                    state, metrics = self.train_step(state, batch)
                    self.profiler.after(step, metrics)
                    self.window.add(step, metrics)
                    self.skips.flags.append(metrics["skipped"])
                    last_step = step == cfg.train.steps
                    if step % cfg.log.interval == 0 or last_step:
                        self.log(step)
                    if self.evals and (step % cfg.train.eval_interval == 0 or last_step):
                        self.eval(state, step)
                    stop = flag.poll(step)  # every step, on every host (multi-host preemption)
                    if step % cfg.checkpoint.interval == 0 or last_step or stop:
                        self.check_skips(step)
                        self.save(state, step)
                if start >= cfg.train.steps and self.evals:
                    # resumed after the last step (e.g. a stage whose summary was not written):
                    # report its eval
                    self.last = {}
                    self.eval(state, start, note=" (resumed at the end)")
                if flag.stop:
                    self.ckpt.wait()
                    self.console.say(
                        f"stopped by signal after step {step}; checkpoint saved in {self.ckpt.directory}"
                    )
        except jax.errors.JaxRuntimeError as e:
            finish_saves(self.ckpt)  # a save in flight still completes: no step is lost
            if not is_out_of_memory(e):
                raise
            raise out_of_memory(e, cfg, step) from None
        except Exception:
            finish_saves(self.ckpt)  # e.g. eval data that fails mid-run: the steps saved so far stay
            raise
        finally:
            self.profiler.stop(step)
        self.ckpt.close()
        self.writer.close()
        return {**self.last, "stopped": flag.stop}

    def log(self, step: int) -> None:
        row = self.window.row(step)
        if row["skipped_steps"]:
            self.console.say(
                f"warning: {row['skipped_steps']} of the last {self.window.window_steps} steps skipped "
                f"(non-finite loss or gradients; {self.skips.total} in this run): params left unchanged"
            )
        if hasattr(self.task.stats, "as_metrics"):
            row.update(self.task.stats.as_metrics())
        self.console.progress(step, self.cfg.train.steps, row, self.window.eta(step, self.cfg.train.steps))
        self.writer.write(self.step_offset + step, {**row, **self.tags})
        self.last = row
        self.check_skips(step)

    def eval(self, state: dict, step: int, note: str = "") -> None:
        ev = evaluate_task(self.eval_step, state, self.task, self.mesh, self.cfg.train.eval_steps)
        if self.task.evaluate is not None:
            ev.update(self.task.evaluate(self.graphdef, state))
        if ev:
            self.writer.write(self.step_offset + step, {**ev, **self.tags})
            self.console.say(f"eval @ {step}{note}: {describe_eval(ev)}")
            self.last = {**self.last, **ev}
        if self.sampler is not None:
            rows = self.sampler(self.graphdef, state)
            self.writer.write_samples(self.step_offset + step, [{**r, **self.tags} for r in rows])
            for r in rows:
                self.console.say(f"sample @ {step}: {r['prompt']!r} -> {r['completion']!r}")

    def save(self, state: dict, step: int) -> None:
        if not bool(all_finite(state["params"])):  # one pass over the params, at save time only
            self.console.say(
                f"warning: params are not finite at step {step}; checkpoint not written "
                f"(the newest one is kept)"
            )
            return
        self.ckpt.save(
            step, checkpointed(state, self.cfg), self.task.train_iter.get_state(), self.config_dict
        )

    def check_skips(self, step: int) -> None:
        """Counts the skipped steps since the last check (one host read); stops on a run of them."""
        try:
            self.skips.update(step)
        except TrainingError:
            self.ckpt.wait()
            saved = self.ckpt.steps()
            raise TrainingError(
                f"{self.skips.message}; the newest checkpoint is "
                f"{f'step {saved[-1]}' if saved else 'none'} in {self.ckpt.directory}"
            ) from None


def _next_step_batch(it, accum: int) -> dict:
    micro = [next(it) for _ in range(accum)]
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}
