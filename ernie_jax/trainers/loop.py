"""The one training loop: setup checks, init or resume, jitted steps, eval, logging, checkpoints, signals.

Reads top to bottom: workdir -> data -> model -> checkpoint (resume / init_from) -> loop -> final save.
Trainers plug in through `Task` (trainers/task.py: data, objective, hooks); the loop itself knows
nothing of the loss or of any trainer's extra state.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np

from ernie_jax.checkpoint.lock import WorkdirLock
from ernie_jax.checkpoint.manager import Checkpointer, abstract_like
from ernie_jax.checkpoint.restore import kept_optimizer_state, state_from_workdir
from ernie_jax.config import Config, check_same_model, layer_plan, to_dict
from ernie_jax.convert.convert import params_from_pretrained
from ernie_jax.errors import ConfigError, DataError, TrainingError, is_out_of_memory
from ernie_jax.metrics import Console, MetricsWriter, device_peak_flops, train_flops_per_token
from ernie_jax.model import build_model
from ernie_jax.ops.attention import check_backend
from ernie_jax.parallel.mesh import build_mesh, data_parallel_size, describe, place_batch
from ernie_jax.parallel.pipeline import check_pipeline_batch, schedule_for
from ernie_jax.summary import count_params
from ernie_jax.trainers.memory import check_fits, out_of_memory
from ernie_jax.trainers.state import init_opt_state, init_train_state, make_optimizer
from ernie_jax.trainers.step import make_eval_step, make_train_step
from ernie_jax.trainers.task import Task


def check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write-probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable ({e.strerror}); pass a directory you can write") \
            from None


def check_run_settings(cfg: Config, mesh, platform: str) -> None:
    """Settings that depend on the devices, checked before any compute: the batch splits over the
    data-parallel axes and pipeline microbatches, and the attention backend exists on `platform`."""
    if cfg.data.batch_size % data_parallel_size(mesh):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be divisible by the data-parallel size "
                          f"{data_parallel_size(mesh)} (mesh data x fsdp x expert x pipeline)")
    check_pipeline_batch(cfg, mesh)
    check_backend(cfg.model.attention, platform, cfg.model.attention_interpret)


def _init_from(path: str, cfg: Config, state: dict) -> tuple[dict, dict, str]:
    """(params, buffers, note) from a training workdir, a converted orbax dir or a HF directory."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        parts, n, left_out = state_from_workdir(path, cfg, state)
        total = len(jax.tree.leaves(state["params"])) + len(jax.tree.leaves(state["buffers"]))
        notes = [f"{total - n} new tensors keep their initialisation"] if n != total else []
        notes += [f"{left_out} tensors of the source this model does not have left out (e.g. MTP layers)"] \
            if left_out else []
        note = f" ({'; '.join(notes)})" if notes else ""
        return parts["params"], parts["buffers"], note
    params, buffers = params_from_pretrained(path, cfg, state["params"], state["buffers"])
    return params, buffers, ""


class _StopFlag:
    """SIGTERM/SIGINT: finish the current step, save, exit cleanly."""

    def __init__(self):
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def jit_train_step(step_fn, state, mesh):
    """jit with the state's layout pinned on the way out, so step k+1 takes step k's output as is
    (no drift of optimizer-moment shardings, no recompiles); metrics come back replicated."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    return MeshJit(jax.jit(step_fn, out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())),
                           donate_argnums=0), mesh)


class MeshJit:
    """A jitted function traced and run with `mesh` set (`jax.set_mesh` must be outside jit), so layers
    that need the mesh (expert-parallel transports) can read it."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def _next_step_batch(it, accum: int) -> dict:
    micro = [next(it) for _ in range(accum)]
    return {k: np.stack([m[k] for m in micro]) for k in micro[0]}


def run(cfg: Config, workdir: str, task_factory: Callable[[Config], Task], quiet: bool = False,
        log_dir: str | None = None, tags: dict | None = None, step_offset: int = 0,
        keep_optimizer_from: str | None = None) -> dict:
    """Train `cfg` in `workdir`; returns the last logged metrics (+ "stopped" when a signal ended it).
    Stages use `log_dir` (one metrics.jsonl for the whole recipe), `tags` (e.g. the stage name) and
    `step_offset` (logged steps continue across stages). One run at a time holds a workdir."""
    check_workdir(workdir)
    with WorkdirLock(workdir):
        return _run(cfg, workdir, task_factory, quiet, log_dir, tags or {}, step_offset, keep_optimizer_from)


def _run(cfg, workdir, task_factory, quiet, log_dir, tags, step_offset, keep_optimizer_from) -> dict:
    console = Console(quiet)
    task = task_factory(cfg)
    if task.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer has {task.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
                        f"set model.vocab_size>={task.vocab_size} or use a matching tokenizer")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint.keep, cfg.checkpoint.async_save)
    had_steps = bool(ckpt.steps())
    newest = ckpt.newest_config() if had_steps else None
    if newest is not None:
        check_same_model(newest[1], cfg, workdir)

    mesh = build_mesh(cfg)
    check_run_settings(cfg, mesh, jax.default_backend())
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.train.freeze)
    graphdef, state = init_train_state(cfg, lambda rngs: build_model(cfg, rngs), tx, mesh)
    if task.init_state is not None:   # before the restore: its entries are part of the checkpoint
        state.update(task.init_state(state))
    restored = ckpt.restore_latest(abstract_like(state)) if ckpt.steps() else None
    if had_steps and restored is None:
        console.say(f"warning: every checkpoint in {ckpt.directory} is damaged (set aside as <step>.damaged-*); "
                    f"starting from scratch")
    if restored is not None:
        step0, state, data_state = restored
        console.say(f"resumed from {ckpt.directory} at step {step0}")
    elif cfg.checkpoint.init_from:
        state["params"], state["buffers"], note = _init_from(cfg.checkpoint.init_from, cfg, state)
        state["opt_state"] = init_opt_state(tx, state["params"], mesh)
        if keep_optimizer_from:
            state["opt_state"] = kept_optimizer_state(keep_optimizer_from, state["opt_state"])
            note += "; optimizer moments kept, schedule restarted"
        if task.init_state is not None:   # e.g. DPO's reference: the params just loaded
            state.update(task.init_state(state))
        console.say(f"initialised params from {cfg.checkpoint.init_from}{note}")
    if task.prepare is not None:
        task = dataclasses.replace(task, **task.prepare(graphdef, state, mesh, workdir, fresh=restored is None))
    if restored is not None:
        task.train_iter.set_state(data_state)
    start = int(state["step"])

    counts = count_params(cfg)
    accum, seq = cfg.optimizer.grad_accum_steps, cfg.data.seq_len
    tokens_per_step = accum * cfg.data.batch_size * seq
    peak, peak_src = device_peak_flops(jnp.dtype(cfg.model.dtype))
    flops_per_token = train_flops_per_token(cfg, seq)
    devices = jax.devices()
    console.say(f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
                f"processes: {jax.process_count()}, mesh: {describe(mesh)}")
    if schedule_for(cfg) is not None:
        plan = layer_plan(cfg)
        console.say(schedule_for(cfg).describe(plan.num_units or plan.num_prefix))
    console.say(f"model: {counts['total'] / 1e6:.2f}M params, {counts['active'] / 1e6:.2f}M active; "
                f"{task.description}")
    logs = "" if not log_dir else f", metrics to {os.path.abspath(log_dir)}"
    console.say(f"writing to {os.path.abspath(workdir)} (checkpoints/{logs or ', metrics.jsonl, tb/'}); "
                f"peak {peak / 1e12:.2f} TFLOP/s/device ({peak_src})")

    train_step = jit_train_step(make_train_step(graphdef, cfg, tx, task.objective, cfg.train.steps,
                                                task.batch_inputs), state, mesh)
    eval_step = MeshJit(jax.jit(make_eval_step(graphdef, cfg, task.objective, task.batch_inputs)), mesh)
    writer = MetricsWriter(log_dir or workdir, cfg.log.tensorboard, resume_step=step_offset + start)
    config_dict = to_dict(cfg)
    last: dict = {}
    sums, count = None, 0
    t_log, t_first = time.perf_counter(), None

    skips = SkipCounter(cfg.train.max_skipped_steps)

    def save(step):
        if not bool(_all_finite(state["params"])):   # one pass over the params, at save time only
            console.say(f"warning: params are not finite at step {step}; checkpoint not written "
                        f"(the newest one is kept)")
            return
        ckpt.save(step, state, task.train_iter.get_state(), config_dict)

    def check_skips(step):
        """Counts the skipped steps since the last check (one host read); stops on a run of them."""
        try:
            skips.update(step)
        except TrainingError:
            ckpt.wait()
            saved = ckpt.steps()
            raise TrainingError(f"{skips.message}; the newest checkpoint is "
                                f"{f'step {saved[-1]}' if saved else 'none'} in {ckpt.directory}") from None

    compiled: dict = {}

    def run_step(state, batch):
        # compiled once per batch layout (a stage mixture alternates text and image-text batches);
        # a step that cannot fit is refused before it runs
        key = (jax.tree.structure(batch), tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch)))
        if key not in compiled:
            compiled[key] = train_step.lower(state, batch).compile()
            need = check_fits(compiled[key], cfg, devices[0])
            console.say(f"train step compiled: {need / 1e9:.2f} GB per device")
        return compiled[key](state, batch)

    step = start
    try:
        with _StopFlag() as flag:
            while step < cfg.train.steps and not flag.stop:
                batch = place_batch(_next_step_batch(task.train_iter, accum), mesh, batch_dim=1)
                state, metrics = run_step(state, batch)
                step += 1
                sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
                count += 1
                skips.flags.append(metrics["skipped"])
                if t_first is None:
                    jax.block_until_ready(metrics)
                    t_first, t_log, count_at_first = time.perf_counter(), time.perf_counter(), step
                if step % cfg.log.interval == 0 or step == cfg.train.steps:
                    host = jax.device_get(sums)
                    now = time.perf_counter()
                    skipped = int(host.pop("skipped"))
                    # averages over the steps that updated; none when every step was skipped
                    row = {k: v / (count - skipped) for k, v in host.items() if k != "tokens"} \
                        if count > skipped else {}
                    row["skipped_steps"] = skipped
                    if skipped:
                        console.say(f"warning: {skipped} of the last {count} steps skipped (non-finite loss or "
                                    f"gradients; {skips.total} in this run): params left unchanged")
                    timed = step - count_at_first
                    if timed > 0 and now > t_log:
                        steps_since = min(count, timed)
                        row["tokens_per_s"] = tokens_per_step * steps_since / (now - t_log)
                        row["mfu"] = flops_per_token * row["tokens_per_s"] / (peak * len(devices))
                    row["step_time_s"] = (now - t_log) / max(count, 1)
                    if hasattr(task.stats, "as_metrics"):
                        row.update(task.stats.as_metrics())
                    eta = (now - t_first) / max(step - count_at_first, 1) * (cfg.train.steps - step)
                    console.progress(step, cfg.train.steps, row, eta)
                    writer.write(step_offset + step, {**row, **tags})
                    last = row
                    sums, count, t_log = None, 0, time.perf_counter()
                    check_skips(step)
                if task.eval_batches is not None and (step % cfg.train.eval_interval == 0 or step == cfg.train.steps):
                    ev = evaluate_task(eval_step, state, task, mesh, cfg.train.eval_steps)
                    writer.write(step_offset + step, {**ev, **tags})
                    console.say(f"eval @ {step}: {describe_eval(ev)}")
                    last = {**last, **ev}
                if step % cfg.checkpoint.interval == 0 or step == cfg.train.steps or flag.stop:
                    check_skips(step)
                    save(step)
            if start >= cfg.train.steps and task.eval_batches is not None:
                # resumed after the last step (e.g. a stage whose summary was not written): report its eval
                last = evaluate_task(eval_step, state, task, mesh, cfg.train.eval_steps)
                writer.write(step_offset + start, {**last, **tags})
                console.say(f"eval @ {start} (resumed at the end): {describe_eval(last)}")
            if flag.stop:
                ckpt.wait()
                console.say(f"stopped by signal after step {step}; checkpoint saved in {ckpt.directory}")
    except jax.errors.JaxRuntimeError as e:
        _finish_saves(ckpt)   # a save in flight still completes: no step is lost
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(e, cfg, step + 1) from None
    except Exception:
        _finish_saves(ckpt)   # e.g. eval data that fails mid-run: the steps saved so far stay
        raise
    ckpt.close()
    writer.close()
    return {**last, "stopped": flag.stop}


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                              if jnp.issubdtype(x.dtype, jnp.inexact)]))


class SkipCounter:
    """Steps the train step skipped (non-finite loss / gradients / updates): their per-step flags
    stay on the device until a log line or a save reads them; `max_in_a_row` in a row stop the run."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.flags = max_in_a_row, []
        self.in_a_row = self.total = 0
        self.first = None
        self.message = ""

    def update(self, step: int) -> None:
        flags, self.flags = jax.device_get(self.flags), []
        for k, skipped in enumerate(flags):
            if skipped > 0:
                self.in_a_row += 1
                self.total += 1
                self.first = step - len(flags) + k + 1 if self.in_a_row == 1 else self.first
            else:
                self.in_a_row = 0
            if self.in_a_row >= self.max_in_a_row:
                self.message = (f"loss or gradients not finite for {self.in_a_row} steps in a row (steps "
                                f"{self.first}-{self.first + self.in_a_row - 1}, updates skipped; "
                                f"train.max_skipped_steps={self.max_in_a_row}): lower optimizer.learning_rate, "
                                f"raise optimizer.warmup_steps or check the data")
                raise TrainingError(self.message)


def _finish_saves(ckpt: Checkpointer) -> None:
    """Let a save in flight finish before an error propagates; its own failure is only logged."""
    try:
        ckpt.wait()
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        logging.warning("a checkpoint save in flight failed while stopping: %s", e)


def describe_eval(ev: dict) -> str:
    """The console text of one eval: loss and perplexity, extra evals, or why there is none."""
    if "eval_loss" not in ev:
        return ("no target tokens in the eval batches (every eval sample is masked out), nothing to score; "
                "check the eval data or set data.eval_fraction=0")
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
