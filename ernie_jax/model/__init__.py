"""Model modules. `build_model(cfg, rngs)` returns the text or the VL model the config describes."""

from __future__ import annotations

from ernie_jax.config import Config
from ernie_jax.model.ernie import ErnieForCausalLM
from ernie_jax.model.ernie_vl import ErnieVLForConditionalGeneration
from ernie_jax.model.lora import apply_lora
from ernie_jax.parallel.layout import model_layout


def build_model(cfg: Config, rngs):
    """ErnieForCausalLM for text configs, ErnieVLForConditionalGeneration when vision.enabled; the
    mesh layout (pipeline schedule, context shards, expert parallelism) comes from `cfg.mesh` /
    `cfg.pipeline`. With `lora.enabled` adapters are attached and the rest frozen (model/lora.py)."""
    layout = model_layout(cfg)
    if cfg.vision.enabled:
        model = ErnieVLForConditionalGeneration(
            cfg.model, cfg.moe, cfg.vision, cfg.precision, layout, rngs=rngs
        )
    else:
        model = ErnieForCausalLM(cfg.model, cfg.moe, cfg.precision, layout, rngs=rngs, vision=cfg.vision)
    # adapters draw their own key after the base: the base weights are those of the plain model
    return apply_lora(model, cfg.lora, rngs.params()) if cfg.lora.enabled else model
