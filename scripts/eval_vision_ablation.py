"""Does a trained VL model read the images? Eval loss on the held-out image-text split with the
real pixels vs the same batches with every image replaced by another sample's (rolled by one item)
and with blank images. A model that uses its vision path scores much better on the real pixels.

    python -m ernie_jax.train --config configs/tiny_vl.yaml --workdir runs/tiny_vl
    python scripts/eval_vision_ablation.py --config configs/tiny_vl.yaml --workdir runs/tiny_vl
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from ernie_jax.checkpoint.manager import Checkpointer, abstract_like
from ernie_jax.config import load_config
from ernie_jax.data.multimodal import load_multimodal, packed_multimodal_batches
from ernie_jax.model import build_model
from ernie_jax.parallel.mesh import build_mesh
from ernie_jax.trainers.lm import lm_objective
from ernie_jax.trainers.state import init_train_state, make_optimizer
from ernie_jax.trainers.step import make_eval_step


def _roll_images(batch: dict, merge2: int) -> dict:
    """Give every vision item the pixels of the next one (same sizes in the embedded set)."""
    frames = batch["frame_ids"]
    real = frames > 0
    n = int(real.sum())
    per_frame = np.bincount(frames[real])[1:]
    if len(set(per_frame.tolist())) != 1:
        raise SystemExit("rolling needs equally sized frames (true for the embedded set)")
    out = dict(batch)
    out["patches"] = batch["patches"].copy()
    out["patches"][:n] = np.roll(batch["patches"][:n], per_frame[0], axis=0)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--batches", type=int, default=8)
    a = p.parse_args()
    cfg = load_config(a.config)
    mesh = build_mesh(cfg)
    graphdef, state = init_train_state(
        cfg, lambda r: build_model(cfg, r), make_optimizer(cfg.optimizer, 1), mesh
    )
    ckpt = Checkpointer(os.path.join(a.workdir, "checkpoints"), cfg.checkpoint.keep, False)
    step, state, _ = ckpt.restore_latest(abstract_like(state))
    data = load_multimodal(cfg)
    eval_step = jax.jit(make_eval_step(graphdef, cfg, lm_objective))
    merge2 = cfg.vision.spatial_merge**2
    variants = {
        "real images": lambda b: b,
        "images rolled by one item": lambda b: _roll_images(b, merge2),
        "blank images": lambda b: {**b, "patches": np.zeros_like(b["patches"])},
    }
    print(f"checkpoint step {step}, {a.batches} eval batches")
    for name, change in variants.items():
        it = iter(packed_multimodal_batches(data.eval, data.tokenizer, cfg, data.stats, seed=1))
        total = tokens = 0.0
        for _ in range(a.batches):
            m = jax.device_get(eval_step(state, change(next(it))))
            total += float(m["lm_loss"]) * float(m["tokens"])
            tokens += float(m["tokens"])
        print(f"  {name:<28} eval loss {total / tokens:.4f}")


if __name__ == "__main__":
    main()
