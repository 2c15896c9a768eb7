"""FP8 vs bf16 train-step time and MFU on the current device, measured in one run.

    python scripts/bench_fp8.py [--config configs/tiny_moe.yaml --hidden 1024 --layers 4 --seq-len 1024]

A matmul-heavy variant of the config (wide hidden and expert widths) is trained for a few steps in
bf16 and under each FP8 setting; the table gives step time, tokens/s, MFU (MoE-aware model FLOPs over
the device's bf16 peak) and the speed ratio to bf16. On Hopper GPUs XLA rewrites the quantize-
dequantize pattern into FP8 GEMMs; on CPU FP8 is emulated and slower (the ratio there measures the
emulation overhead, not FP8 hardware).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax.config import load_config
from ernie_jax.metrics import device_peak_flops, train_flops_per_token
from ernie_jax.model import build_model
from ernie_jax.parallel.mesh import build_mesh
from ernie_jax.trainers.compiled import jit_train_step
from ernie_jax.trainers.lm import lm_objective
from ernie_jax.trainers.state import init_train_state, make_optimizer
from ernie_jax.trainers.step import make_train_step

SETTINGS = [
    ("bf16", "off", "current"),
    ("fp8 experts, blockwise", "experts", "blockwise"),
    ("fp8 experts, delayed", "experts", "delayed"),
    ("fp8 all_linear, current", "all_linear", "current"),
    ("fp8 all_linear, delayed", "all_linear", "delayed"),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny_moe.yaml")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    peak, src = device_peak_flops(jnp.bfloat16)
    print(
        f"device: {jax.devices()[0].device_kind} (peak {peak / 1e12:.1f} TFLOP/s, {src}); {a.config} with "
        f"hidden {a.hidden}, {a.layers} layers, batch {a.batch} x {a.seq_len}, bf16 compute"
    )
    print(f"{'setting':<26}{'step ms':>10}{'tokens/s':>11}{'MFU':>8}{'speed vs bf16':>15}")
    base = None
    for name, mode, recipe in SETTINGS:
        cfg = load_config(
            a.config,
            [
                f"precision.fp8={mode}",
                f"precision.fp8_recipe={recipe}",
                f"model.hidden_size={a.hidden}",
                f"model.intermediate_size={4 * a.hidden}",
                f"moe.intermediate_size={a.hidden}",
                "model.head_dim=64",
                f"model.num_heads={a.hidden // 64}",
                f"model.num_kv_heads={max(1, a.hidden // 256)}",
                f"model.num_layers={a.layers}",
                "model.dtype=bfloat16",
                "model.mtp_depth=0",
                f"data.seq_len={a.seq_len}",
                f"data.batch_size={a.batch}",
                "mesh.data=1",
            ],
        )
        mesh = build_mesh(cfg, jax.devices()[:1])
        tx = make_optimizer(cfg.optimizer, 100)
        graphdef, state = init_train_state(cfg, lambda r: build_model(cfg, r), tx, mesh)
        ids = (
            np.random.default_rng(0)
            .integers(3, cfg.model.vocab_size, (1, a.batch, a.seq_len + 1))
            .astype(np.int32)
        )
        batch = {
            "input_ids": ids[..., :-1],
            "labels": ids[..., 1:],
            "loss_mask": np.ones((1, a.batch, a.seq_len), np.float32),
        }
        step = jit_train_step(make_train_step(graphdef, cfg, tx, lm_objective, 100), state, mesh)
        state, m = step(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        sec = (time.perf_counter() - t0) / a.steps
        tps = a.batch * a.seq_len / sec
        mfu = train_flops_per_token(cfg, a.seq_len) * tps / peak
        base = base or sec
        print(f"{name:<26}{sec * 1e3:>10.1f}{tps:>11.0f}{mfu * 100:>7.1f}%{base / sec:>15.2f}")


if __name__ == "__main__":
    main()
