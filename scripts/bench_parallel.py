"""Step time, compiled memory per device and collective traffic for each parallel layout.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_parallel.py [--config FILE]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_parallel.py --pipeline

`--pipeline` compares GPipe and circular schedules with the same microbatches (and no pipeline as
the baseline) on a deeper model: bubble fraction, peak memory per device = arguments + outputs -
aliased + temporaries, from `compile().memory_analysis()`. Then GPipe against 1F1B, and the
circular schedule against interleaved 1F1B (2 chunks per stage), for M = 4, 8, 16 microbatches of a
fixed size (the batch grows with M): temporaries per device and step time side by side, with their
ratios. Last, what 1F1B keeps per chunk in flight (`pipeline.stash`: inputs or residuals) under
model.remat=full and none, at M = 8.

On fake CPU devices the times only compare layouts against each other (the devices share the cores);
memory per device and the collectives counted from the compiled HLO are what the layout changes.
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import numpy as np

from ernie_jax.config import load_config
from ernie_jax.model import build_model
from ernie_jax.parallel.mesh import batch_sharding, build_mesh, describe
from ernie_jax.parallel.pipeline import schedule_for
from ernie_jax.trainers.lm import lm_objective
from ernie_jax.trainers.state import init_train_state, make_optimizer
from ernie_jax.trainers.compiled import jit_train_step
from ernie_jax.trainers.step import make_train_step

LAYOUTS = [
    ["mesh.data=-1"],
    ["mesh.data=1", "mesh.fsdp=-1"],
    ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    ["mesh.data=2", "mesh.expert=4"],
    ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4"],
    ["mesh.data=2", "mesh.expert=4", "moe.transport=all_to_all"],
    ["mesh.data=2", "mesh.expert=4", "moe.transport=allgather"],
]
# 8 MoE units (9 layers) so that 4 stages x 2 repeats divide them
PIPELINE_BASE = ["model.num_layers=9", "data.batch_size=16"]
PIPELINE_LAYOUTS = [
    ["mesh.data=8"],
    ["mesh.data=2", "mesh.pipeline=4", "pipeline.microbatches=8"],
    [
        "mesh.data=2",
        "mesh.pipeline=4",
        "pipeline.microbatches=8",
        "pipeline.schedule=circular",
        "pipeline.repeats=2",
    ],
    ["mesh.data=2", "mesh.pipeline=4", "pipeline.microbatches=4"],
    [
        "mesh.data=2",
        "mesh.pipeline=4",
        "pipeline.microbatches=4",
        "pipeline.schedule=circular",
        "pipeline.repeats=2",
    ],
    [
        "mesh.data=1",
        "mesh.expert=2",
        "mesh.pipeline=4",
        "pipeline.microbatches=8",
        "pipeline.schedule=circular",
        "pipeline.repeats=2",
    ],
]
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collective_bytes(hlo: str) -> dict[str, float]:
    """Sum of result sizes (MB) of each collective kind in the optimized HLO."""
    sizes = {"f32": 4, "bf16": 2, "s32": 4, "f16": 2, "u32": 4, "pred": 1}
    out = {c: 0.0 for c in COLLECTIVES}
    for line in hlo.splitlines():
        for c in COLLECTIVES:
            if f" {c}(" in line or f" {c}-start(" in line:
                for dtype, dims in re.findall(
                    r"(f32|bf16|s32|f16|u32|pred)\[([\d,]*)\]", line.split("=")[1][:300]
                ):
                    n = np.prod([int(d) for d in dims.split(",") if d]) if dims else 1
                    out[c] += n * sizes[dtype] / 2**20
                break
    return out


def measure(cfg, steps: int):
    """(step ms, memory stats, collective MB by kind) of the jitted train step on cfg's mesh."""
    mesh = build_mesh(cfg)
    tx = make_optimizer(cfg.optimizer, 100)
    graphdef, state = init_train_state(cfg, lambda r: build_model(cfg, r), tx, mesh)
    rng = np.random.default_rng(0)
    s = cfg.data.seq_len
    ids = rng.integers(3, cfg.model.vocab_size, (1, cfg.data.batch_size, s + 1)).astype(np.int32)
    batch = {
        "input_ids": ids[..., :-1],
        "labels": ids[..., 1:],
        "loss_mask": np.ones((1, cfg.data.batch_size, s), np.float32),
    }
    batch = {k: jax.device_put(v, batch_sharding(mesh, 3, 1)) for k, v in batch.items()}
    step = jit_train_step(make_train_step(graphdef, cfg, tx, lm_objective, 100), state, mesh)
    compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    traffic = collective_bytes(compiled.as_text())
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps * 1e3, mem, traffic, mesh


def peak_mb(mem) -> float:
    return (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    ) / 2**20


def pipeline_table(config: str, steps: int) -> None:
    print(
        f"{'layout':<44}{'bubble':>8}{'step ms':>9}{'args MB':>9}{'temp MB':>9}{'peak MB':>9}"
        f"{'permute MB':>11}  (per device)"
    )
    for layout in PIPELINE_LAYOUTS:
        cfg = load_config(config, PIPELINE_BASE + layout + ["model.dtype=float32"])
        sched = schedule_for(cfg)
        ms, mem, traffic, mesh = measure(cfg, steps)
        name = describe(mesh) + (
            f" M={sched.microbatches}" + (f" R={sched.repeats}" if sched.repeats > 1 else "") if sched else ""
        )
        bubble = f"{sched.bubble_fraction:.1%}" if sched else "-"
        print(
            f"{name:<44}{bubble:>8}{ms:9.1f}{mem.argument_size_in_bytes / 2**20:9.2f}"
            f"{mem.temp_size_in_bytes / 2**20:9.2f}{peak_mb(mem):9.2f}{traffic['collective-permute']:11.2f}"
        )


def microbatch_settings(m: int, rows_per_microbatch: int) -> list[str]:
    """4 stages x data 2 with M = m microbatches of a fixed size (the batch grows with M), fp32."""
    return PIPELINE_BASE[:1] + [
        f"data.batch_size={m * rows_per_microbatch}",
        "mesh.data=2",
        "mesh.pipeline=4",
        f"pipeline.microbatches={m}",
        "model.dtype=float32",
    ]


def one_f_one_b_table(config: str, steps: int, rows_per_microbatch: int = 4) -> None:
    """GPipe vs 1F1B and circular vs interleaved 1F1B (2 chunks per stage) on 4 stages x 2-way data
    parallel, M microbatches of a fixed size."""
    pairs = {"": ["pipeline.repeats=1"], " x2": ["pipeline.repeats=2"]}
    print(
        f"\n{'M':>3}{'batch':>7}  {'schedules':<26}{'temp MB':>16}{'ratio':>7}{'ms':>16}{'ratio':>7}"
        "  (per device; 4 stages x data 2)"
    )
    for m in (4, 8, 16):
        base = microbatch_settings(m, rows_per_microbatch)
        for suffix, extra in pairs.items():
            got = {}
            names = ("gpipe", "1f1b") if not suffix else ("circular", "1f1b")
            for kind in names:
                cfg = load_config(config, base + extra + [f"pipeline.schedule={kind}"])
                ms, mem, _, _ = measure(cfg, steps)
                got[kind] = (mem.temp_size_in_bytes / 2**20, ms)
            (gt, gms), (ot, oms) = got[names[0]], got[names[1]]
            label = f"{names[0]}{suffix} vs 1f1b{suffix}"
            print(
                f"{m:3d}{m * rows_per_microbatch:7d}  {label:<26}{gt:8.1f}{ot:8.1f}{ot / gt:7.2f}"
                f"{gms:8.1f}{oms:8.1f}{oms / gms:7.2f}",
                flush=True,
            )


RESIDUALS = "pipeline.stash=residuals"


def stash_table(config: str, steps: int, m: int = 8, rows_per_microbatch: int = 4) -> None:
    """What 1F1B keeps per chunk in flight: inputs (recompute the chunk in the backward) vs the
    forward's residuals, under model.remat=full and none, next to GPipe / circular."""
    base = microbatch_settings(m, rows_per_microbatch)
    print(
        f"\n{'remat':<6}{'schedule':<32}{'temp MB':>9}{'step ms':>9}  (per device; 4 stages x data 2, M={m})"
    )
    for remat in ("full", "none"):
        for label, sets in (
            ("gpipe", ["pipeline.schedule=gpipe"]),
            ("1f1b, stash inputs", ["pipeline.schedule=1f1b"]),
            ("1f1b, stash residuals", ["pipeline.schedule=1f1b", RESIDUALS]),
            ("circular x2", ["pipeline.schedule=circular", "pipeline.repeats=2"]),
            ("1f1b x2, stash inputs", ["pipeline.schedule=1f1b", "pipeline.repeats=2"]),
            (
                "1f1b x2, stash residuals",
                ["pipeline.schedule=1f1b", "pipeline.repeats=2", "pipeline.stash=residuals"],
            ),
        ):
            ms, mem, _, _ = measure(load_config(config, base + sets + [f"model.remat={remat}"]), steps)
            print(f"{remat:<6}{label:<32}{mem.temp_size_in_bytes / 2**20:9.1f}{ms:9.0f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny_moe.yaml")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pipeline", action="store_true", help="compare pipeline schedules instead of layouts")
    a = p.parse_args()
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, config {a.config}")
    if a.pipeline:
        pipeline_table(a.config, a.steps)
        one_f_one_b_table(a.config, a.steps)
        return stash_table(a.config, a.steps)
    print(f"{'layout':<32}{'step ms':>9}{'temp MB/dev':>13}{'args MB/dev':>13}  collectives MB (HLO)")
    for layout in LAYOUTS:
        cfg = load_config(a.config, layout + ["data.batch_size=8", "model.dtype=float32"])
        try:
            build_mesh(cfg)
        except Exception as e:  # noqa: BLE001 - a layout this device count cannot hold
            print(f"{' '.join(layout):<32} skipped: {e}")
            continue
        ms, mem, traffic, mesh = measure(cfg, a.steps)
        temp = getattr(mem, "temp_size_in_bytes", 0) / 2**20
        args = getattr(mem, "argument_size_in_bytes", 0) / 2**20
        comm = ", ".join(f"{k} {v:.1f}" for k, v in traffic.items() if v)
        transport = cfg.moe.transport if cfg.moe.transport != "auto" else ""
        print(
            f"{(describe(mesh) + ' ' + transport).strip():<32}{ms:9.1f}{temp:13.2f}{args:13.2f}  "
            f"{comm or 'none'}"
        )


if __name__ == "__main__":
    main()
