"""LoRA vs full fine-tuning, measured side by side.

1. Memory plan of the released configs (abstract shapes, nothing allocated): trainable params and
   bytes of params + AdamW state for full fine-tuning (fp32 master weights + two fp32 moments) and for
   LoRA r=8 / r=32 (frozen base in bf16, adapters and their moments in fp32).
2. SFT on configs/sft_tiny.yaml from the same pretrained tiny base: step time, peak RSS and the eval
   loss drop of full fine-tuning vs LoRA r=16 (the target: LoRA's drop within 10% of full's).

    python scripts/bench_lora.py              # both parts
    python scripts/bench_lora.py --plan-only  # part 1 (a few seconds per config)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
from flax import nnx

from ernie_jax.config import load_config
from ernie_jax.model import build_model
from ernie_jax.model.lora import FrozenParam

CONFIGS = (
    "configs/ernie45_21b_a3b.yaml",
    "configs/ernie45_300b_a47b.yaml",
    "configs/ernie45_vl_424b_a47b.yaml",
)
GB = 1e9


def _sizes(state) -> tuple[int, int]:
    leaves = jax.tree.leaves(nnx.to_pure_dict(state))
    return sum(x.size for x in leaves), sum(x.size * x.dtype.itemsize for x in leaves)


def plan(path: str, rank: int | None) -> dict:
    sets = ["model.mtp_depth=0"]
    if rank:
        sets += ["lora.enabled=true", f"lora.rank={rank}", "lora.base_dtype=bfloat16"]
        if "vl" in path:
            sets.append("lora.targets=[attention,mlp,experts,vision_experts]")
    cfg = load_config(path, sets)
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    trainable, trainable_bytes = _sizes(nnx.state(abstract, nnx.Param))
    frozen, frozen_bytes = _sizes(nnx.state(abstract, FrozenParam))
    moments = 2 * trainable * 4  # AdamW m and v in fp32
    return {
        "trainable": trainable,
        "total": trainable + frozen,
        "bytes": trainable_bytes + frozen_bytes + moments,
    }


def memory_table() -> None:
    print(
        "| model | full FT: trainable | params + AdamW | LoRA r=8: trainable | bytes "
        "| LoRA r=32: trainable | bytes |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in CONFIGS:
        rows = [plan(path, r) for r in (None, 8, 32)]
        name = os.path.basename(path).removesuffix(".yaml")
        cells = [
            f"{r['trainable'] / 1e9:.2f}B"
            if i == 0
            else f"{r['trainable'] / 1e6:.1f}M ({r['trainable'] / rows[0]['trainable']:.3%})"
            for i, r in enumerate(rows)
        ]
        print(
            f"| {name} | {cells[0]} | {rows[0]['bytes'] / GB:.0f} GB | {cells[1]} "
            f"| {rows[1]['bytes'] / GB:.0f} GB | {cells[2]} | {rows[2]['bytes'] / GB:.0f} GB |",
            flush=True,
        )


RUNNER = (
    "import resource, runpy, sys; sys.argv = ['train'] + sys.argv[1:]\n"
    "try:\n    runpy.run_module('ernie_jax.train', run_name='__main__')\n"
    "except SystemExit as e:\n    assert not e.code, e.code\n"
    "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def train(workdir: str, config: str, sets: list[str]) -> dict:
    args = ["--config", config, "--workdir", workdir, "--quiet"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    rss = int(r.stdout.split("PEAK_RSS_KB")[-1].split()[0]) * 1024
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [x for x in rows if "step_time_s" in x]
    evals = [x for x in rows if "eval_loss" in x]
    times = [x["step_time_s"] for x in steps][1:]  # the first window includes compilation
    return {
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "step_s": sum(times) / len(times) if times else None,
        "tok_s": steps[-1].get("tokens_per_s"),
        "rss": rss,
    }


def sft_comparison(steps: int) -> None:
    tmp = tempfile.mkdtemp(prefix="bench_lora_")
    base = os.path.join(tmp, "base")
    print("pretraining the tiny base (configs/tiny_moe.yaml, MTP off) ...", flush=True)
    train(base, "configs/tiny_moe.yaml", ["model.mtp_depth=0", "train.steps=300", "checkpoint.interval=300"])
    common = [
        f"checkpoint.init_from={base}",
        f"train.steps={steps}",
        f"train.eval_interval={steps}",
        "train.eval_steps=8",
    ]
    start = train(
        os.path.join(tmp, "start"),
        "configs/sft_tiny.yaml",
        common[:1]
        + ["optimizer.learning_rate=0", "train.steps=1", "train.eval_interval=1", "train.eval_steps=8"],
    )
    full = train(os.path.join(tmp, "full"), "configs/sft_tiny.yaml", common)
    lora = train(
        os.path.join(tmp, "lora"),
        "configs/sft_tiny.yaml",
        common + ["lora.enabled=true", "lora.rank=16", "optimizer.learning_rate=5e-3"],
    )
    drop_full, drop_lora = start["eval_loss"] - full["eval_loss"], start["eval_loss"] - lora["eval_loss"]
    print(
        f"\nSFT on sft_tiny, {steps} steps from the same base (eval loss at start {start['eval_loss']:.4f}):"
    )
    print("| run | eval loss | drop | step time | peak RSS |")
    print("|---|---|---|---|---|")
    for name, r, d in (("full FT (lr 1e-3)", full, drop_full), ("LoRA r=16 (lr 5e-3)", lora, drop_lora)):
        ms, mib = r["step_s"] * 1e3, r["rss"] / 2**20
        print(f"| {name} | {r['eval_loss']:.4f} | {d:.4f} | {ms:.1f} ms | {mib:.0f} MiB |")
    print(
        f"LoRA / full: eval-loss drop {drop_lora / drop_full:.3f} (target >= 0.9), "
        f"step time {lora['step_s'] / full['step_s']:.2f}x, peak RSS {lora['rss'] / full['rss']:.2f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan-only", action="store_true")
    p.add_argument("--steps", type=int, default=200, help="SFT steps of each run")
    args = p.parse_args()
    memory_table()
    if not args.plan_only:
        sft_comparison(args.steps)


if __name__ == "__main__":
    main()
