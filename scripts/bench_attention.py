"""Attention forward + backward: ernie_jax `flash` and `dense` vs PyTorch's fused CPU
`scaled_dot_product_attention`, measured side by side in one run.

    python scripts/bench_attention.py [--seq 512,2048,8192,32768 --head-dims 64,128 --repeats 3]

Causal, fp32, batch 1, 8 query heads over 2 kv heads (GQA; torch with enable_gqa=True). Each case
runs in its own process so its peak memory is its own: `peak MB` is the resident-set high-water
mark during the timed steps over the process's resident set just before them (the inputs and the
compiled program already there; /proc/self/clear_refs resets the mark after compiling). `dense`
is skipped where its S x S logits would not fit (--dense-max). Prints torch time / ours (> 1: we
are faster) and memory per token, which stays flat for a linear-memory kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _worker(impl: str, s: int, d: int, heads: int, kv_heads: int, repeats: int, threads: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, s, h, d), dtype=np.float32) for h in (heads, kv_heads, kv_heads))
    if impl == "torch":
        import torch

        torch.set_num_threads(threads)
        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

        def step():
            out = torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, is_causal=True, enable_gqa=True
            )
            out.sum().backward()
            for t in (tq, tk, tv):
                t.grad = None

        run = step
    else:
        import jax
        import jax.numpy as jnp
        from ernie_jax.ops.attention import AttentionSpec, dot_product_attention

        spec = AttentionSpec(backend=impl, causal=True)
        seg = jnp.ones((1, s), jnp.int32)
        grad = jax.jit(
            jax.grad(
                lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, seg, seg, spec=spec)),
                argnums=(0, 1, 2),
            )
        )
        jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
        compiled = grad.lower(jq, jk, jv).compile()

        def run():
            jax.block_until_ready(compiled(jq, jk, jv))

    run()  # warm-up (and, for torch, its workspace)
    base = _rss_mb("VmRSS")
    _reset_peak()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return {"time_s": best, "peak_mb": max(_rss_mb("VmHWM") - base, 0.0)}


def _case(impl, s, d, a) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--seq",
        str(s),
        "--head-dims",
        str(d),
        "--heads",
        str(a.heads),
        "--kv-heads",
        str(a.kv_heads),
        "--repeats",
        str(a.repeats),
        "--threads",
        str(a.threads),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {impl} S={s} D={d} failed: {tail[:160]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", default="512,2048,8192,32768")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--dense-max", type=int, default=8192, help="longest sequence the dense backend is run at")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--worker", default="")
    a = p.parse_args()
    if a.worker:
        print(
            json.dumps(
                _worker(a.worker, int(a.seq), int(a.head_dims), a.heads, a.kv_heads, a.repeats, a.threads)
            )
        )
        return
    print(
        f"attention fwd+bwd, causal, fp32, batch 1, {a.heads} query / {a.kv_heads} kv heads, "
        f"{a.threads} threads; ratio = torch time / ours (> 1: faster than torch)"
    )
    print(
        f"{'D':>4}{'S':>7} | {'torch ms':>9}{'MB':>8} | {'flash ms':>9}{'MB':>8}{'ratio':>7}"
        f" | {'dense ms':>9}{'MB':>8}{'ratio':>7} | {'flash KB/token':>14}"
    )
    for d in (int(x) for x in a.head_dims.split(",")):
        for s in (int(x) for x in a.seq.split(",")):
            torch_r, flash_r = _case("torch", s, d, a), _case("flash", s, d, a)
            dense_r = _case("dense", s, d, a) if s <= a.dense_max else None
            cell = lambda r: f"{r['time_s'] * 1e3:9.1f}{r['peak_mb']:8.0f}" if r else f"{'-':>9}{'-':>8}"
            ratio = lambda r: f"{torch_r['time_s'] / r['time_s']:6.2f}x" if r and torch_r else f"{'-':>7}"
            per_token = f"{flash_r['peak_mb'] * 1024 / s:14.1f}" if flash_r else f"{'-':>14}"
            print(
                f"{d:4d}{s:7d} | {cell(torch_r)} | {cell(flash_r)}{ratio(flash_r)} | "
                f"{cell(dense_r)}{ratio(dense_r)}"
                f" | {per_token}",
                flush=True,
            )


if __name__ == "__main__":
    main()
