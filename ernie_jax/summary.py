"""Parameter counts per component, total and active, from abstract shapes only (no allocation).

    python -m ernie_jax.summary --config configs/ernie45_300b_a47b.yaml

Active = what one token touches: routed experts count top_k/E of their size. MTP layers are
training-only and reported separately (not in the totals), as are non-trainable buffers.
"""

from __future__ import annotations

import sys
from collections import defaultdict

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from ernie_jax.config import Config, load_config
from ernie_jax.errors import ErnieJaxError
from ernie_jax.model import build_model
from ernie_jax.model.param_parts import COMPONENTS, param_part


def count_params(cfg: Config) -> dict[str, float]:
    """{component: params, 'total', 'active', 'active_non_embedding', 'buffers'} from shapes only."""
    abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    counts: dict[str, float] = defaultdict(float)
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        n = float(np.prod(var.shape, dtype=np.float64))
        if isinstance(var, nnx.Param):
            counts[param_part(path).component] += n
        else:
            counts["buffers"] += n
    out = {c: counts.get(c, 0.0) for c in COMPONENTS}
    out["buffers"] = counts.get("buffers", 0.0)
    out["total"] = sum(v for c, v in out.items() if c not in ("mtp", "buffers"))
    frac = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe.num_experts else 1.0
    # active = what one text token touches (the VL vision parts serve image/video tokens only)
    vision_parts = sum(out[c] for c in ("vision_experts", "vision_router", "vit", "adapter"))
    out["active"] = out["total"] - out["routed_experts"] * (1.0 - frac) - vision_parts
    out["active_non_embedding"] = out["active"] - out["embedding"]
    e = cfg.moe
    if e.vision_num_experts:  # a vision token: its own experts (top-k of them) instead of the text ones
        vfrac = (e.vision_top_k or e.top_k) / e.vision_num_experts
        out["active_vision_token"] = (
            out["active"]
            - out["routed_experts"] * frac
            - out["router"]
            + out["vision_experts"] * vfrac
            + out["vision_router"]
        )
    return out


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:.0f}"


def format_summary(cfg: Config, counts: dict[str, float]) -> str:
    e = cfg.moe
    frac = e.top_k / e.num_experts if e.num_experts else 1.0
    scale = {"routed_experts": frac, "vision_experts": 0.0, "vision_router": 0.0, "vit": 0.0, "adapter": 0.0}
    lines = [f"{'component':<16}{'total':>12}{'active':>12}"]
    for c in COMPONENTS:
        if counts[c]:
            active = counts[c] * scale.get(c, 1.0)
            lines.append(f"{c:<16}{_fmt(counts[c]):>12}{_fmt(active):>12}")
    lines.append("-" * 40)
    lines.append(f"{'total (no MTP)':<16}{_fmt(counts['total']):>12}{_fmt(counts['active']):>12}")
    lines.append(
        f"{'non-embedding':<16}{_fmt(counts['total'] - counts['embedding']):>12}"
        f"{_fmt(counts['active_non_embedding']):>12}"
    )
    if "active_vision_token" in counts:
        lines.append(
            f"(active counts a text token; a vision token touches {_fmt(counts['active_vision_token'])} "
            "in the decoder, plus the ViT and adapter)"
        )
    if counts["buffers"]:
        lines.append(f"non-trainable buffers (routing bias): {_fmt(counts['buffers'])}")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("config", None, "YAML config file")
    flags.DEFINE_multi_string("set", [], "override, e.g. --set moe.top_k=4")


def main(argv):
    del argv
    if not FLAGS.config:
        print("error: --config is required (e.g. --config configs/ernie45_21b_a3b.yaml)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(FLAGS.config, FLAGS.set)
    except ErnieJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jax.config.update("jax_platforms", "cpu")
    print(format_summary(cfg, count_params(cfg)))
    return 0


def cli() -> None:
    """The `ernie-jax-summary` console script."""
    _define_flags()
    app.run(main)


if __name__ == "__main__":
    cli()
