"""Model modules. `build_model(cfg, rngs)` returns the text or the VL model the config describes."""
from __future__ import annotations


def build_model(cfg, rngs):
    """ErnieForCausalLM for text configs, ErnieVLForConditionalGeneration when vision.enabled."""
    if cfg.vision.enabled:
        from ernie_jax.model.ernie_vl import ErnieVLForConditionalGeneration
        return ErnieVLForConditionalGeneration(cfg, rngs=rngs)
    from ernie_jax.model.ernie import ErnieForCausalLM
    return ErnieForCausalLM(cfg, rngs=rngs)
