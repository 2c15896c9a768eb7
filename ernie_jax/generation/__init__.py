"""Generation: `generate(model, input_ids, ...)` with a KV cache and sampling."""

from ernie_jax.generation.generate import Generated, generate, generation_split, pad_prompts

__all__ = ["Generated", "generate", "generation_split", "pad_prompts"]
