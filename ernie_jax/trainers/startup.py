"""Everything before the first step: the workdir, the task's data, device-dependent settings, and the
starting state (resumed, initialised from another model, or fresh), each checked before any compute."""

from __future__ import annotations

import dataclasses
import os
import socket

import jax
import jax.numpy as jnp

from ernie_jax.checkpoint.manager import Checkpointer, abstract_like
from ernie_jax.checkpoint.restore import kept_optimizer_state, state_from_workdir
from ernie_jax.config import Config, check_same_model, layer_plan, lora_difference
from ernie_jax.convert.convert import params_from_pretrained
from ernie_jax.convert.peft import adapters_from_peft
from ernie_jax.errors import CheckpointError, ConfigError, DataError
from ernie_jax.metrics import Console, device_peak_flops
from ernie_jax.model import build_model
from ernie_jax.model.lora import base_config
from ernie_jax.ops.attention import check_backend
from ernie_jax.parallel.mesh import data_parallel_size, describe
from ernie_jax.parallel.pipeline import check_pipeline_batch, schedule_for
from ernie_jax.paths import as_path, join, probe_write, shown
from ernie_jax.summary import count_params
from ernie_jax.trainers.state import checkpointed, init_opt_state, init_train_state
from ernie_jax.trainers.task import Task


def check_workdir(workdir: str) -> None:
    """The workdir (a local directory or a gs:// URL) exists and takes a file, before any compute."""
    try:
        as_path(workdir).mkdir(parents=True, exist_ok=True)
        # one probe per process: hosts sharing the workdir (NFS, GCS) must not remove each other's
        probe_write(workdir, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    except OSError as e:
        raise ConfigError(
            f"--workdir {workdir} is not writable ({e.strerror or e}); pass a directory you can write"
        ) from None


def check_vocab(task: Task, cfg: Config) -> None:
    if task.vocab_size > cfg.model.vocab_size:
        raise DataError(
            f"tokenizer has {task.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size>={task.vocab_size} or use a matching tokenizer"
        )


def open_checkpoints(workdir: str, cfg: Config) -> Checkpointer:
    """The workdir's checkpoints; the newest one must hold the same model as `cfg`."""
    ckpt = Checkpointer(join(workdir, "checkpoints"), cfg.checkpoint.keep, cfg.checkpoint.async_save)
    newest = ckpt.newest_config() if ckpt.steps() else None
    if newest is not None:
        check_same_model(newest[1], cfg, workdir)
        why = lora_difference(newest[1], cfg)
        if why:
            raise CheckpointError(
                f"{workdir} holds a checkpoint with {why}; use another --workdir or match it"
            )
    return ckpt


def check_run_settings(cfg: Config, mesh, platform: str) -> None:
    """Settings that depend on the devices, checked before any compute: the batch splits over the
    data-parallel axes and pipeline microbatches, and the attention backend exists on `platform`."""
    if cfg.data.batch_size % data_parallel_size(mesh):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be divisible by the data-parallel size "
            f"{data_parallel_size(mesh)} (mesh data x fsdp x expert x pipeline)"
        )
    check_pipeline_batch(cfg, mesh)
    check_backend(cfg.model.attention, platform, cfg.model.attention_interpret)


@dataclasses.dataclass
class Start:
    graphdef: object
    state: dict
    data_state: object = None  # the train iterator's state when resumed
    resumed: bool = False


def starting_state(
    cfg: Config, task: Task, ckpt: Checkpointer, tx, mesh, console: Console, keep_optimizer_from: str | None
) -> Start:
    """The newest readable checkpoint, else `checkpoint.init_from`, else a fresh init; the task's extra
    state (init_state) is part of all three."""
    had_steps = bool(ckpt.steps())
    graphdef, state = init_train_state(cfg, lambda rngs: build_model(cfg, rngs), tx, mesh)
    if task.init_state is not None:  # before the restore: its entries are part of the checkpoint
        state.update(task.init_state(state))
    restored = ckpt.restore_latest(abstract_like(checkpointed(state, cfg))) if ckpt.steps() else None
    if had_steps and restored is None:
        console.say(
            f"warning: every checkpoint in {ckpt.directory} is damaged (set aside as <step>.damaged-*); "
            f"starting from scratch"
        )
    if restored is not None:
        step0, restored_state, data_state = restored
        if "base" in state and "base" not in restored_state:  # adapters-only checkpoint: base re-read
            restored_state["base"] = state["base"]
            if cfg.checkpoint.init_from:
                restored_state["base"], _, _ = initial_base(cfg.checkpoint.init_from, cfg, state)
        console.say(f"resumed from {ckpt.directory} at step {step0}")
        return Start(graphdef, restored_state, data_state, resumed=True)
    loaded = []
    if cfg.checkpoint.init_from:
        load = initial_base if cfg.lora.enabled else initial_params
        key = "base" if cfg.lora.enabled else "params"
        state[key], state["buffers"], note = load(cfg.checkpoint.init_from, cfg, state)
        loaded.append(f"{'base ' if cfg.lora.enabled else ''}params from {cfg.checkpoint.init_from}{note}")
    if cfg.lora.enabled and cfg.lora.init_from:
        state["params"] = initial_adapters(cfg.lora.init_from, cfg, state)
        loaded.append(f"adapters from {cfg.lora.init_from}")
    if loaded:
        state["opt_state"] = init_opt_state(tx, state["params"], mesh)
        if keep_optimizer_from:
            state["opt_state"] = kept_optimizer_state(keep_optimizer_from, state["opt_state"])
            loaded[-1] += "; optimizer moments kept, schedule restarted"
        if task.init_state is not None:  # e.g. DPO's reference: the params just loaded
            state.update(task.init_state(state))
        console.say(f"initialised {' and '.join(loaded)}")
    return Start(graphdef, state)


def initial_params(path: str, cfg: Config, state: dict) -> tuple[dict, dict, str]:
    """(params, buffers, note) from a training workdir, a converted orbax dir or a HF directory."""
    if as_path(join(path, "checkpoints")).is_dir():
        parts, n, left_out = state_from_workdir(path, cfg, state)
        total = len(jax.tree.leaves(state["params"])) + len(jax.tree.leaves(state["buffers"]))
        notes = [f"{total - n} new tensors keep their initialisation"] if n != total else []
        notes += (
            [f"{left_out} tensors of the source this model does not have left out (e.g. MTP layers)"]
            if left_out
            else []
        )
        note = f" ({'; '.join(notes)})" if notes else ""
        return parts["params"], parts["buffers"], note
    params, buffers = params_from_pretrained(path, cfg, state["params"], state["buffers"])
    return params, buffers, ""


def initial_base(path: str, cfg: Config, state: dict) -> tuple[dict, dict, str]:
    """(base, buffers, note) of a LoRA run: the frozen weights from a full-weight source (a training
    workdir, a converted orbax dir or a HF directory), in lora.base_dtype."""
    full = {**state, "params": state["base"]}
    params, buffers, note = initial_params(path, base_config(cfg), full)
    return params, buffers, note


def initial_adapters(path: str, cfg: Config, state: dict) -> dict:
    """lora.init_from: the adapters of a PEFT directory or of an ernie_jax LoRA workdir's newest step."""
    if as_path(join(path, "checkpoints")).is_dir():
        parts, n, _ = state_from_workdir(path, cfg, state, keys=("params",), adapters=True)
        if n != len(jax.tree.leaves(state["params"])):
            raise CheckpointError(
                f"lora.init_from={path}: its adapters cover {n} of this run's "
                f"{len(jax.tree.leaves(state['params']))} adapter tensors; match lora.targets and lora.rank"
            )
        return parts["params"]
    return adapters_from_peft(path, cfg, state["params"])


def announce(cfg: Config, task: Task, mesh, workdir: str, log_dir: str | None, console: Console) -> tuple:
    """The start-up lines (devices, mesh, pipeline schedule, model size, data, where files go);
    returns the device peak FLOP/s the MFU is measured against."""
    peak, peak_src = device_peak_flops(jnp.dtype(cfg.model.dtype))
    counts = count_params(cfg)
    devices = jax.devices()
    console.say(
        f"devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
        f"processes: {jax.process_count()}, mesh: {describe(mesh, cfg.mesh)}"
    )
    if schedule_for(cfg) is not None:
        console.say(schedule_for(cfg).describe(layer_plan(cfg).pipelined_depth))
    console.say(
        f"model: {counts['total'] / 1e6:.2f}M params, {counts['active'] / 1e6:.2f}M active; "
        f"{task.description}"
    )
    logs = "" if not log_dir else f", metrics to {shown(log_dir)}"
    console.say(
        f"writing to {shown(workdir)} (checkpoints/{logs or ', metrics.jsonl, tb/'}); "
        f"peak {peak / 1e12:.2f} TFLOP/s/device ({peak_src})"
    )
    return peak
