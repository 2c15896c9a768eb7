"""Ahead-of-time compile of the real train step for a TPU slice, on a machine without a TPU.

    python -m ernie_jax.aot --config configs/ernie45_21b_a3b.yaml --topology v5p:4x4x8 \\
        [--num_slices 2 --set mesh.dcn.data=2] [--set mesh.fsdp=-1 --set data.seq_len=32768 ...] [--json]

With libtpu installed (`pip install -e '.[tpu]'`, in its own venv), `get_topology_desc` describes
the slice's chips; the train step is lowered on a mesh of them with the state as shapes only
(nothing is allocated) and compiled by the TPU compiler. Printed: the mesh, the attention
backend, XLA's per-chip memory (arguments = params + optimizer state + batch, temporaries,
outputs not aliased to donated inputs), whether that fits the chip's HBM, and the compiled FLOPs
per chip and step, with the step time they would take at peak and at ERNIE's reported 47% MFU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

# the local backend stays the CPU; the TPU exists only as a compile target
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "YAML config file (configs/*.yaml)")
flags.DEFINE_string("topology", "v5p:4x4x8", "TPU topology, e.g. v5e:2x2, v5p:4x4x8, v6e:16x16")
flags.DEFINE_integer("num_slices", 1, "slices of that topology (multi-slice; give the split with mesh.dcn.*)")
flags.DEFINE_multi_string("set", [], "config override, repeatable: --set data.seq_len=32768")
flags.DEFINE_bool("json", False, "print one JSON object per compiled config instead of the report")
flags.DEFINE_string("stage", "", "for a config with stages: compile only this stage (default: every stage)")

# HBM per chip in bytes (vendor figures)
HBM_BYTES = {
    "TPU v4": 32 << 30,
    "TPU v5 lite": 16 << 30,
    "TPU v5e": 16 << 30,
    "TPU v5p": 95 << 30,
    "TPU v5": 95 << 30,
    "TPU v6 lite": 32 << 30,
    "TPU v6e": 32 << 30,
    "TPU7x": 192 << 30,
}
ERNIE_MFU = 0.47  # ERNIE 4.5 technical report, pretraining of the 300B-A47B model


def _lookup(table: dict, kind: str):
    for name in sorted(table, key=len, reverse=True):
        if name.lower() in kind.lower():
            return table[name]
    return None


def topology_devices(name: str, num_slices: int = 1):
    """The chips of `num_slices` slices of a TPU topology, or ConfigError naming the fix when libtpu
    is missing."""
    from jax.experimental import topologies
    from ernie_jax.errors import ConfigError

    if num_slices < 1:
        raise ConfigError(f"--num_slices {num_slices} must be >= 1")
    try:
        kw = {"num_slices": num_slices} if num_slices > 1 else {}
        return topologies.get_topology_desc(platform="tpu", topology_name=name, **kw).devices
    except Exception as e:  # libtpu absent, or an unknown topology name
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"--topology {name}: cannot describe this TPU topology ({first}); it needs libtpu "
            f"(pip install -e '.[tpu]' in its own venv) and a name like v5e:2x2 or v5p:4x4x8"
        ) from None


def abstract_batch(cfg, mesh) -> dict:
    """ShapeDtypeStructs of one step's batch [A, B, S, ...], placed as the loop places real ones."""
    import jax
    import jax.numpy as jnp
    from ernie_jax.parallel.mesh import batch_sharding

    d, a = cfg.data, cfg.optimizer.grad_accum_steps
    shapes = {
        "input_ids": ((a, d.batch_size, d.seq_len), jnp.int32),
        "labels": ((a, d.batch_size, d.seq_len), jnp.int32),
        "loss_mask": ((a, d.batch_size, d.seq_len), jnp.float32),
        "segment_ids": ((a, d.batch_size, d.seq_len), jnp.int32),
    }
    if cfg.vision.enabled:
        v = cfg.vision
        rows = d.max_patches // v.spatial_merge**2
        shapes.update(
            positions=((a, d.batch_size, d.seq_len, 3), jnp.int32),
            patches=((a, d.max_patches, v.in_channels * v.patch_size**2), jnp.float32),
            patch_hw=((a, d.max_patches, 2), jnp.int32),
            frame_ids=((a, d.max_patches), jnp.int32),
            pair_first=((a, rows), jnp.int32),
            pair_second=((a, rows), jnp.int32),
            row_valid=((a, rows), jnp.bool_),
        )
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape), 1))
        for k, (shape, dtype) in shapes.items()
    }


def compile_report(cfg, topology: str, num_slices: int = 1) -> dict:
    """Compile cfg's train step for `num_slices` x `topology`; per-chip memory, FLOPs and whether it
    fits."""
    import jax
    from ernie_jax.errors import is_out_of_memory
    from ernie_jax.metrics import PEAK_FLOPS, train_flops_per_token
    from ernie_jax.model import build_model
    from ernie_jax.ops.attention import resolve_backend
    from ernie_jax.parallel.mesh import build_mesh, data_parallel_size, describe
    from ernie_jax.trainers.compiled import jit_train_step
    from ernie_jax.trainers.startup import check_run_settings
    from ernie_jax.trainers.memory import step_bytes
    from ernie_jax.trainers.lm import lm_objective
    from ernie_jax.trainers.state import abstract_train_state, make_optimizer
    from ernie_jax.trainers.step import make_train_step

    devices = topology_devices(topology, num_slices)
    backend = resolve_backend(cfg.model.attention, "tpu")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=backend))
    mesh = build_mesh(cfg, devices)
    check_run_settings(cfg, mesh, "tpu")
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.train.freeze, cfg.lora.lora_plus_ratio)
    graphdef, state = abstract_train_state(cfg, lambda r: build_model(cfg, r), tx, mesh)
    step = jit_train_step(make_train_step(graphdef, cfg, tx, lm_objective, cfg.train.steps), state, mesh)
    kind = devices[0].device_kind
    hbm = _lookup(HBM_BYTES, kind)
    head = {
        "topology": topology if num_slices == 1 else f"{num_slices} x {topology}",
        "chips": len(devices),
        "device_kind": kind,
        "mesh": describe(mesh, cfg.mesh),
        "attention": backend,
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.data.batch_size,
        "hbm_gb": hbm / 1e9 if hbm else None,
    }
    try:
        compiled = step.lower(state, abstract_batch(cfg, mesh)).compile()
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        # the TPU compiler refuses programs that exceed HBM: report it as "does not fit"
        need = re.search(r"temporaries \(([\d.]+)G\)", str(e))
        return {
            **head,
            "fits": False,
            "temp_gb": float(need.group(1)) * 2**30 / 1e9 if need else None,
            "compile_error": str(e).strip().splitlines()[0][:300],
        }
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_chip = step_bytes(compiled)
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    peak = _lookup(PEAK_FLOPS, kind)
    tokens = cfg.optimizer.grad_accum_steps * cfg.data.batch_size * cfg.data.seq_len
    model_flops = train_flops_per_token(cfg, cfg.data.seq_len) * tokens / len(devices)
    return {
        **head,
        "data_parallel": data_parallel_size(mesh),
        "tokens_per_step": tokens,
        "argument_gb": mem.argument_size_in_bytes / 1e9,
        "temp_gb": mem.temp_size_in_bytes / 1e9,
        "output_gb": (mem.output_size_in_bytes - mem.alias_size_in_bytes) / 1e9,
        "per_chip_gb": per_chip / 1e9,
        "fits": bool(hbm and per_chip <= hbm),
        "compiled_tflops_per_chip": flops / 1e12,
        "model_tflops_per_chip": model_flops / 1e12,
        "step_s_at_peak": model_flops / peak if peak else None,
        "step_s_at_ernie_mfu": model_flops / (peak * ERNIE_MFU) if peak else None,
    }


def _print(r: dict, config: str) -> None:
    if "compile_error" in r:
        need = f"{r['temp_gb']:.0f} GB of temporaries" if r["temp_gb"] else "more than the chip has"
        print(
            f"{config} on {r['topology']}: {r['chips']} x {r['device_kind']}, mesh {r['mesh']}, attention "
            f"{r['attention']}\n  DOES NOT FIT: the TPU compiler needs {need} per chip, the chip has "
            f"{r['hbm_gb']:.1f} GB; use more chips, mesh.context / mesh.fsdp, model.remat=full or a smaller "
            f"data.batch_size"
        )
        return
    fits = "fits" if r["fits"] else "DOES NOT FIT"
    hbm = f"{r['hbm_gb']:.1f}" if r["hbm_gb"] else "?"
    print(
        f"{config} on {r['topology']}: {r['chips']} x {r['device_kind']}, mesh {r['mesh']}, "
        f"attention {r['attention']}"
    )
    print(f"  batch {r['batch_size']} x {r['seq_len']} tokens ({r['tokens_per_step']} per step)")
    print(
        f"  per chip: {r['per_chip_gb']:.2f} GB of {hbm} GB HBM -> {fits}  "
        f"(arguments {r['argument_gb']:.2f}, "
        f"temporaries {r['temp_gb']:.2f}, outputs {r['output_gb']:.2f})"
    )
    line = (
        f"  FLOPs per chip and step: {r['compiled_tflops_per_chip']:.1f} T compiled, "
        f"{r['model_tflops_per_chip']:.1f} T model"
    )
    if r["step_s_at_peak"]:
        line += f"; step {r['step_s_at_peak']:.2f} s at peak, {r['step_s_at_ernie_mfu']:.2f} s at 47% MFU"
    print(line)


def main(argv) -> int:
    if len(argv) > 1:
        print(
            f"error: unexpected arguments {argv[1:]}; use --config FILE --topology NAME --set key=value",
            file=sys.stderr,
        )
        return 2
    if not FLAGS.config:
        print("error: --config is required, e.g. --config configs/ernie45_21b_a3b.yaml", file=sys.stderr)
        return 2
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    from ernie_jax.config import load_config, stage_config
    from ernie_jax.errors import ConfigError, ErnieJaxError

    try:
        cfg = load_config(FLAGS.config, FLAGS.set)
        names = [st.name for st in cfg.stages]
        if FLAGS.stage and FLAGS.stage not in names:
            raise ConfigError(
                f"--stage {FLAGS.stage}: the config has no such stage; its stages are {names or 'none'}"
            )
        todo = [
            (f"{FLAGS.config} [{st.name}]", stage_config(cfg, st))
            for st in cfg.stages
            if FLAGS.stage in ("", st.name)
        ] or [(FLAGS.config, cfg)]
        for label, run_cfg in todo:
            report = compile_report(run_cfg, FLAGS.topology, FLAGS.num_slices)
            if FLAGS.json:
                print(json.dumps({"config": label, **report}))
            else:
                _print(report, label)
    except ErnieJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
