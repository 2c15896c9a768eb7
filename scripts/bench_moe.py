"""MoE block vs a dense SwiGLU with the same active FLOPs: fwd+bwd time ratios on the current device.

    python scripts/bench_moe.py [--tokens 8192 --hidden 512 --expert-width 256 --top-k 2]

Prints, measured in one run: dense time / MoE time ("MoE/dense" speed, 1.0 = as fast as dense) for
each dispatch mode at E=8, and the MoE time at E=64 over E=8 (same top-k, same active FLOPs).
Multimodal case: the heterogeneous layer (E text experts + E vision experts of 1/3 the width, as in
ERNIE-VL-28B) on a 50/50 text/vision batch vs a text-only batch of the same length (target <= 1.2),
and vs a text-only MoE layer without vision experts.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.config import MoEConfig
from ernie_jax.model.layers import SwiGLU
from ernie_jax.model.moe import MoEBlock


def _time(fn, *args, repeats: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _fwd_bwd(module, x, moe: bool, modality=None):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    mask = jnp.ones(x.shape[:2], bool)

    def loss(params, x):
        m = nnx.merge(graphdef, params, rest)
        y = m(x, mask, modality)[0] if moe else m(x)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-width", type=int, default=256)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    dtype = jnp.dtype(a.dtype)
    x = jax.random.normal(jax.random.key(0), (1, a.tokens, a.hidden), dtype)
    kw = dict(rngs=nnx.Rngs(0), std=0.02, dtype=dtype)
    dense = SwiGLU(a.hidden, a.top_k * a.expert_width, **kw)
    fn, params = _fwd_bwd(dense, x, moe=False)
    t_dense = _time(fn, params, x, repeats=a.repeats)
    print(
        f"device: {jax.devices()[0].device_kind}  tokens={a.tokens} H={a.hidden} I_expert={a.expert_width} "
        f"top_k={a.top_k} dtype={a.dtype}"
    )
    print(f"dense SwiGLU (I={a.top_k * a.expert_width}): {t_dense * 1e3:8.1f} ms fwd+bwd")
    times = {}
    for experts in (8, 64):
        for dispatch in ("dropless", "capacity"):
            cfg = MoEConfig(
                num_experts=experts,
                top_k=a.top_k,
                intermediate_size=a.expert_width,
                dispatch=dispatch,
                capacity_factor=a.capacity_factor,
            )
            block = MoEBlock(a.hidden, cfg, **kw)
            fn, params = _fwd_bwd(block, x, moe=True)
            times[experts, dispatch] = t = _time(fn, params, x, repeats=a.repeats)
            print(f"MoE E={experts:<3} {dispatch:<9}: {t * 1e3:8.1f} ms   MoE/dense speed {t_dense / t:5.2f}")
    best = max(("dropless", "capacity"), key=lambda d: t_dense / times[8, d])
    print(f"\nbetter mode at E=8: {best}, MoE/dense = {t_dense / times[8, best]:.2f} (target >= 0.7)")
    for d in ("dropless", "capacity"):
        print(f"E=64/E=8 time ratio ({d}): {times[64, d] / times[8, d]:.2f} (target <= 1.3)")

    print("\nheterogeneous (VL) layer, E=8 text + 8 vision experts (vision width 1/3):")
    half = (jnp.arange(a.tokens) >= a.tokens // 2).astype(jnp.int32)[None]
    for dispatch in ("capacity", "dropless"):
        cfg = MoEConfig(
            num_experts=8,
            top_k=a.top_k,
            intermediate_size=a.expert_width,
            dispatch=dispatch,
            capacity_factor=a.capacity_factor,
            vision_num_experts=8,
            vision_intermediate_size=max(1, a.expert_width // 3),
        )
        block = MoEBlock(a.hidden, cfg, **kw)
        fn_text, params = _fwd_bwd(block, x, moe=True, modality=jnp.zeros_like(half))
        fn_mixed, _ = _fwd_bwd(block, x, moe=True, modality=half)
        t_text = _time(fn_text, params, x, repeats=a.repeats)
        t_mixed = _time(fn_mixed, params, x, repeats=a.repeats)
        plain = times[8, dispatch]
        print(
            f"  {dispatch:<9}: text-only batch {t_text * 1e3:8.1f} ms, 50/50 batch {t_mixed * 1e3:8.1f} ms, "
            f"50/50 / text-only = {t_mixed / t_text:.2f} (target <= 1.2); "
            f"vs text-only MoE layer {t_text / plain:.2f}x"
        )


if __name__ == "__main__":
    main()
