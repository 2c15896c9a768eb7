"""Plot loss and router-loss curves of a training run: python scripts/plot_metrics.py WORKDIR [--out FILE]"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--out", default=None, help="PNG path (default WORKDIR/metrics.png)")
    a = p.parse_args()
    path = os.path.join(a.workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"error: {path} not found; pass the --workdir of a training run", file=sys.stderr)
        return 2
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [r["step"] for r in train]
    for key in ("loss", "lm_loss", "mtp_loss"):
        if any(key in r for r in train):
            ax1.plot(steps, [r.get(key) for r in train], label=key)
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval_loss")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.set_title("language modelling")
    for key in ("aux_loss", "z_loss", "orth_loss"):
        if any(key in r for r in train):
            ax2.plot(steps, [r.get(key) for r in train], label=key)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.legend()
    ax2.set_title("router losses (summed over MoE layers)")
    fig.tight_layout()
    out = a.out or os.path.join(a.workdir, "metrics.png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
