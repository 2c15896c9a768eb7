"""Compiled peak memory and step time of the train step for each recomputation policy.

    python scripts/bench_memory.py [--config configs/tiny_moe.yaml --seq-len 512 --batch 8 --layers 8]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_memory.py --shards 8

`--shards N`: instead, temp memory per device of the step under N-way data, fsdp and context
sharding with the tokens per device of one device's batch (ideal: the one-device figure).

Memory is XLA's own accounting of the compiled step (`compile().memory_analysis()`): temp bytes are
the activations and workspace, the part recomputation trades for time.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from ernie_jax.config import load_config
from ernie_jax.model import build_model
from ernie_jax.parallel.mesh import build_mesh
from ernie_jax.trainers.compiled import jit_train_step
from ernie_jax.trainers.lm import lm_objective
from ernie_jax.trainers.state import init_train_state, make_optimizer
from ernie_jax.trainers.step import make_train_step

POLICIES = [
    ("none", ()),
    ("full", ()),
    ("dots_saveable", ()),
    ("save_attention_out", ()),
    ("save_qkv_recompute_mlp", ()),
    ("named", ("qkv", "attn_out", "expert_out")),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny_moe.yaml")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--shards", type=int, default=0)
    p.add_argument("--dispatch", default="capacity")
    a = p.parse_args()
    if a.shards:
        return shard_table(a)
    print(
        f"device: {jax.devices()[0].device_kind}; {a.config} with {a.layers} layers, "
        f"batch {a.batch} x {a.seq_len}"
    )
    print(f"{'policy':<34}{'temp MB':>10}{'vs none':>9}{'step ms':>10}")
    base = None
    for name, names in POLICIES:
        sets = [
            f"model.remat={name}",
            f"data.seq_len={a.seq_len}",
            f"data.batch_size={a.batch}",
            f"model.num_layers={a.layers}",
            "mesh.data=1",
        ]
        if names:
            sets.append(f"model.remat_names=[{', '.join(names)}]")
        compiled, state, batch = compile_step(a.config, sets, 1, a.batch, a.seq_len)
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
        ms = (time.perf_counter() - t0) / a.steps * 1e3
        base = base or temp
        label = name + (f"[{','.join(names)}]" if names else "")
        print(f"{label:<34}{temp:10.1f}{base / temp:8.2f}x{ms:10.1f}")


def compile_step(config: str, sets: list[str], devices: int, batch_size: int, seq_len: int):
    """(compiled train step on `devices` devices, its state, a random batch)."""
    cfg = load_config(config, sets)
    mesh = build_mesh(cfg, jax.devices()[:devices])
    tx = make_optimizer(cfg.optimizer, 100)
    graphdef, state = init_train_state(cfg, lambda r: build_model(cfg, r), tx, mesh)
    ids = (
        np.random.default_rng(0)
        .integers(3, cfg.model.vocab_size, (1, batch_size, seq_len + 1))
        .astype(np.int32)
    )
    batch = {
        "input_ids": ids[..., :-1],
        "labels": ids[..., 1:],
        "loss_mask": np.ones((1, batch_size, seq_len), np.float32),
    }
    compiled = (
        jit_train_step(make_train_step(graphdef, cfg, tx, lm_objective, 100), state, mesh)
        .lower(state, batch)
        .compile()
    )
    return compiled, state, batch


def shard_table(a) -> None:
    n = a.shards
    if jax.device_count() < n:
        raise SystemExit(
            f"error: --shards {n} needs {n} devices, this process has {jax.device_count()}; "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    print(
        f"device: {jax.devices()[0].device_kind}; {a.config} with {a.layers} layers, "
        f"moe.dispatch={a.dispatch}, "
        f"{a.batch} x {a.seq_len} tokens per device, remat full"
    )
    print(f"{'mesh':<14}{'global batch':>14}{'temp MB/device':>16}{'vs 1 device':>13}")
    common = [
        f"model.num_layers={a.layers}",
        "model.remat=full",
        f"moe.dispatch={a.dispatch}",
        f"model.max_position_embeddings={max(4096, a.seq_len * n)}",
    ]
    base = None
    for name, axis, batch, seq in [
        ("1 device", None, a.batch, a.seq_len),
        (f"data={n}", "data", a.batch * n, a.seq_len),
        (f"fsdp={n}", "fsdp", a.batch * n, a.seq_len),
        (f"context={n}", "context", a.batch, a.seq_len * n),
    ]:
        sets = common + [f"data.seq_len={seq}", f"data.batch_size={batch}", "mesh.data=1"]
        if axis and axis != "data":
            sets.append(f"mesh.{axis}={n}")
        elif axis == "data":
            sets[-1] = f"mesh.data={n}"
        compiled, _, _ = compile_step(a.config, sets, n if axis else 1, batch, seq)
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        base = base or temp
        print(f"{name:<14}{f'{batch} x {seq}':>14}{temp:16.1f}{temp / base:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
