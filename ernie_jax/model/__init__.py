"""Model modules. `build_model(cfg, rngs)` returns the text or the VL model the config describes."""

from __future__ import annotations

from ernie_jax.model.ernie import ErnieForCausalLM
from ernie_jax.model.ernie_vl import ErnieVLForConditionalGeneration


def build_model(cfg, rngs):
    """ErnieForCausalLM for text configs, ErnieVLForConditionalGeneration when vision.enabled."""
    if cfg.vision.enabled:
        return ErnieVLForConditionalGeneration(cfg, rngs=rngs)
    return ErnieForCausalLM(cfg, rngs=rngs)
