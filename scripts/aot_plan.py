"""The README's TPU plan: `python -m ernie_jax.aot` for the released text models at 4K, 32K and
131072 tokens on chosen slices and meshes, one compile per row, printed as a markdown table.

    python scripts/aot_plan.py [--only 21b] [--timeout 3600]     # needs libtpu (the tpu extra)

Every row is the real train step (AdamW, fp32 master params, bf16 compute) compiled by the TPU
compiler for the topology on this CPU machine; memory is XLA's per-chip accounting.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

# (label, config, topology, overrides): meshes chosen so each sequence fits; long rows split the
# sequence over mesh.context and recompute each layer in the backward pass
EP = ["moe.dispatch=capacity", "moe.capacity_factor=1.25", "moe.transport=all_to_all"]
PLAN = [
    ("21B-A3B 4K", "configs/ernie45_21b_a3b.yaml", "v5p:4x4x8",
     ["data.seq_len=4096", "data.batch_size=128", "mesh.data=1", "mesh.fsdp=16", "mesh.expert=8", "model.remat=full",
      *EP]),
    ("21B-A3B 32K", "configs/ernie45_21b_a3b.yaml", "v5p:4x4x8",
     ["data.seq_len=32768", "data.batch_size=16", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=8", "mesh.context=8",
      "model.remat=full", *EP]),
    ("21B-A3B 128K", "configs/ernie45_21b_a3b.yaml", "v5p:4x4x8",
     ["data.seq_len=131072", "data.batch_size=8", "mesh.data=1", "mesh.fsdp=1", "mesh.expert=8", "mesh.context=16",
      "model.remat=full", *EP]),
    ("300B-A47B 4K", "configs/ernie45_300b_a47b.yaml", "v5p:8x8x16",
     ["data.seq_len=4096", "data.batch_size=1024", "mesh.data=1", "mesh.fsdp=128", "mesh.expert=8", "model.remat=full",
      *EP]),
    ("300B-A47B 32K", "configs/ernie45_300b_a47b.yaml", "v5p:8x8x16",
     ["data.seq_len=32768", "data.batch_size=128", "mesh.data=1", "mesh.fsdp=16", "mesh.expert=8", "mesh.context=8",
      "model.remat=full", *EP]),
    ("300B-A47B 128K", "configs/ernie45_300b_a47b.yaml", "v5p:8x8x16",
     ["data.seq_len=131072", "data.batch_size=32", "mesh.data=1", "mesh.fsdp=4", "mesh.expert=8", "mesh.context=32",
      "model.remat=full", *EP]),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="", help="run the rows whose label contains this")
    p.add_argument("--timeout", type=int, default=3600)
    a = p.parse_args()
    print("| model, tokens | slice | mesh | batch | GB per chip (of HBM) | fits | compiled TFLOP/chip/step |"
          " step s at 47% MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for label, config, topology, sets in PLAN:
        if a.only and a.only.lower() not in label.lower():
            continue
        cmd = [sys.executable, "-m", "ernie_jax.aot", "--config", config, "--topology", topology, "--json"]
        for item in sets:
            cmd += ["--set", item]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["?"])[-1][:150]
            print(f"| {label} | {topology} | - | - | failed: {err} | - | - | - |", flush=True)
            continue
        x = json.loads(r.stdout.strip().splitlines()[-1])
        if "compile_error" in x:
            need = f"{x['temp_gb']:.0f} GB temporaries" if x["temp_gb"] else "?"
            print(f"| {label} | {topology} ({x['chips']} chips) | {x['mesh']} | {x['batch_size']} x {x['seq_len']} | "
                  f"{need} ({x['hbm_gb']:.0f}) | no | - | - |", flush=True)
            continue
        mfu = f"{x['step_s_at_ernie_mfu']:.2f}" if x["step_s_at_ernie_mfu"] else "-"
        print(f"| {label} | {topology} ({x['chips']} chips) | {x['mesh']} | {x['batch_size']} x {x['seq_len']} | "
              f"{x['per_chip_gb']:.1f} ({x['hbm_gb']:.0f}) | {'yes' if x['fits'] else 'no'} | "
              f"{x['compiled_tflops_per_chip']:.1f} | {mfu} |", flush=True)


if __name__ == "__main__":
    main()
