"""The README's TPU plan: `python -m ernie_jax.aot` for the released models (21B-A3B, 300B-A47B,
VL-424B-A47B) at 4K, 32K and 131072 tokens on chosen slices (one, or two with data parallelism across
them: mesh.dcn.data=2) and meshes, one compile per row, printed as a markdown table.

    python scripts/aot_plan.py [--only 21b] [--timeout 3600]     # needs libtpu (the tpu extra)

Every row is the real train step (AdamW, fp32 master params, bf16 compute) compiled by the TPU
compiler for the topology on this CPU machine; memory is XLA's per-chip accounting.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

EP = ["moe.dispatch=capacity", "moe.capacity_factor=1.25", "moe.transport=all_to_all"]


def row(
    label: str,
    model: str,
    topology: str,
    seq: int,
    batch: int,
    fsdp: int,
    context: int = 1,
    slices: int = 1,
    patches_per_row: int = 0,
    extra: tuple = (),
):
    """(label, config, topology, slices, overrides): expert=8 throughout (inside a slice); long rows
    split the sequence over mesh.context; every layer is recomputed in the backward pass; VL rows give
    each sequence `patches_per_row` ViT patches (1024 = one 448 x 448 image, 256 tokens)."""
    vl = [f"data.max_patches={batch * patches_per_row}"] if patches_per_row else []
    return (
        label,
        f"configs/ernie45_{model}.yaml",
        topology,
        slices,
        [
            f"data.seq_len={seq}",
            f"data.batch_size={batch}",
            f"mesh.data={slices}",
            f"mesh.dcn.data={slices}",
            f"mesh.fsdp={fsdp}",
            "mesh.expert=8",
            f"mesh.context={context}",
            "model.remat=full",
            *EP,
            *vl,
            *extra,
        ],
    )


PLAN = [
    row("21B-A3B 4K", "21b_a3b", "v5p:4x4x8", 4096, 128, fsdp=16),
    row("21B-A3B 32K", "21b_a3b", "v5p:4x4x8", 32768, 16, fsdp=2, context=8),
    row("21B-A3B 128K", "21b_a3b", "v5p:4x4x8", 131072, 8, fsdp=1, context=16),
    row("300B-A47B 4K", "300b_a47b", "v5p:8x8x16", 4096, 1024, fsdp=128),
    row("300B-A47B 32K", "300b_a47b", "v5p:8x8x16", 32768, 128, fsdp=16, context=8),
    row("300B-A47B 128K", "300b_a47b", "v5p:8x8x16", 131072, 32, fsdp=4, context=32),
    row("300B-A47B 4K, 2 slices", "300b_a47b", "v5p:8x8x8", 4096, 1024, fsdp=64, slices=2),
    row("VL-424B-A47B 4K", "vl_424b_a47b", "v5p:8x8x16", 4096, 1024, fsdp=128, patches_per_row=1024),
    row(
        "VL-424B-A47B 32K", "vl_424b_a47b", "v5p:8x8x16", 32768, 128, fsdp=16, context=8, patches_per_row=1024
    ),
    row(
        "VL-424B-A47B 4K, 2 slices",
        "vl_424b_a47b",
        "v5p:8x8x8",
        4096,
        1024,
        fsdp=64,
        slices=2,
        patches_per_row=1024,
    ),
    # pipeline stages: GPipe vs 1F1B vs interleaved 1F1B (2 chunks per stage) vs 1F1B keeping the
    # forward's residuals, memory on the same mesh
    *(
        row(
            f"{label} 4K, {stages} stages, M={micro}, {kind}",
            model,
            topology,
            4096,
            batch,
            fsdp=fsdp,
            extra=(f"mesh.pipeline={stages}", f"pipeline.microbatches={micro}", *sets),
        )
        for label, model, topology, batch, fsdp, stages, micro in (
            ("21B-A3B", "21b_a3b", "v5p:4x4x8", 512, 4, 4, 16),
            ("300B-A47B", "300b_a47b", "v5p:8x8x16", 1024, 16, 8, 8),
        )
        for kind, sets in (
            ("gpipe", ("pipeline.schedule=gpipe",)),
            ("1f1b", ("pipeline.schedule=1f1b",)),
            ("interleaved 1f1b x2", ("pipeline.schedule=1f1b", "pipeline.repeats=2")),
            ("1f1b, stash residuals", ("pipeline.schedule=1f1b", "pipeline.stash=residuals")),
        )
    ),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="", help="run the rows whose label contains this")
    p.add_argument("--timeout", type=int, default=3600)
    a = p.parse_args()
    print(
        "| model, tokens | slice | mesh | batch | GB per chip (of HBM) | fits | compiled TFLOP/chip/step |"
        " model TFLOP/chip/step | step s at 47% MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, config, topology, slices, sets in PLAN:
        if a.only and a.only.lower() not in label.lower():
            continue
        cmd = [sys.executable, "-m", "ernie_jax.aot", "--config", config, "--topology", topology, "--json"]
        cmd += ["--num_slices", str(slices)]
        for item in sets:
            cmd += ["--set", item]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        if r.returncode != 0:
            err = (r.stderr.strip().splitlines() or ["?"])[-1][:150]
            print(f"| {label} | {topology} | - | - | failed: {err} | - | - | - | - |", flush=True)
            continue
        x = json.loads(r.stdout.strip().splitlines()[-1])
        if "compile_error" in x:
            need = f"{x['temp_gb']:.0f} GB temporaries" if x["temp_gb"] else "?"
            print(
                f"| {label} | {x['topology']} ({x['chips']} chips) | {x['mesh']} | "
                f"{x['batch_size']} x {x['seq_len']} | "
                f"{need} ({x['hbm_gb']:.0f}) | no | - | - | - |",
                flush=True,
            )
            continue
        mfu = f"{x['step_s_at_ernie_mfu']:.2f}" if x["step_s_at_ernie_mfu"] else "-"
        print(
            f"| {label} | {x['topology']} ({x['chips']} chips) | {x['mesh']} | "
            f"{x['batch_size']} x {x['seq_len']} | "
            f"{x['per_chip_gb']:.1f} ({x['hbm_gb']:.0f}) | {'yes' if x['fits'] else 'no'} | "
            f"{x['compiled_tflops_per_chip']:.1f} | {x['model_tflops_per_chip']:.1f} | {mfu} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
