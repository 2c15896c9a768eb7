"""Long-context training on this machine: the real training CLI on `configs/tiny_moe.yaml`, batch 1,
for growing sequence lengths, with the flash backend (and dense where it fits), side by side.

    python scripts/bench_long_context.py [--seq 2048,4096,8192,16384,32768,65536 --steps 3]

Each run is its own process: `peak RSS` is that process's high-water mark (compile included),
`step s` the mean time of the steps after the first (from metrics.jsonl). Target: S = 65536
trains under 16 GB peak RSS on the 2-core / 24 GB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def run_case(a, s: int, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        sets = [
            f"data.seq_len={s}",
            "data.batch_size=1",
            f"train.steps={a.steps}",
            "log.interval=1",
            f"model.max_position_embeddings={max(s, 4096)}",
            f"model.attention={backend}",
            "train.eval_interval=1000000",
            "train.eval_steps=1",
            "checkpoint.interval=1000000",
            "checkpoint.async_save=false",
            "log.tensorboard=false",
            *a.set,
        ]
        cmd = [sys.executable, "-m", "ernie_jax.train", "--config", a.config, "--workdir", work, "--quiet"]
        for item in sets:
            cmd += ["--set", item]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        err = proc.stderr.read()
        peak_gb = usage.ru_maxrss / 2**20
        if os.waitstatus_to_exitcode(status) != 0:
            lines = err.strip().splitlines() or ["killed"]
            return {"error": lines[-1][:120], "peak_gb": peak_gb}
        rows = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl"))]
        times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
        return {
            "step_s": sum(times) / max(len(times), 1),
            "peak_gb": peak_gb,
            "loss": [r["loss"] for r in rows if "loss" in r][-1],
        }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny_moe.yaml")
    p.add_argument("--seq", default="2048,4096,8192,16384,32768,65536")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dense-max", type=int, default=8192, help="longest sequence to try the dense backend at")
    p.add_argument("--set", action="append", default=[], help="extra config override")
    a = p.parse_args()
    print(f"{a.config}, batch 1, {a.steps} steps per run (the first, with compilation, is not timed)")
    print(
        f"{'S':>7} | {'flash step s':>12}{'peak GB':>9}{'tok/s':>8}{'loss':>8} | "
        f"{'dense step s':>12}{'peak GB':>9}"
        f"{'dense/flash':>12}"
    )
    for s in (int(x) for x in a.seq.split(",")):
        flash = run_case(a, s, "flash")
        dense = run_case(a, s, "dense") if s <= a.dense_max else None

        def cells(r):
            if r is None:
                return f"{'-':>12}{'-':>9}"
            if "error" in r:
                return f"{'failed':>12}{r['peak_gb']:9.1f}"
            return f"{r['step_s']:12.2f}{r['peak_gb']:9.1f}"

        tok = f"{s / flash['step_s']:8.0f}{flash['loss']:8.3f}" if "step_s" in flash else f"{'-':>8}{'-':>8}"
        ratio = (
            f"{dense['step_s'] / flash['step_s']:11.2f}x"
            if dense and "step_s" in dense and "step_s" in flash
            else f"{'-':>12}"
        )
        print(f"{s:7d} | {cells(flash)}{tok} | {cells(dense)}{ratio}", flush=True)
        for name, r in (("flash", flash), ("dense", dense)):
            if r and "error" in r:
                print(f"        {name}: {r['error']}", flush=True)


if __name__ == "__main__":
    main()
