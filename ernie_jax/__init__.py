"""ernie_jax: JAX/Flax NNX training for ERNIE 4.5 text and multimodal MoE models."""

from ernie_jax.errors import CheckpointError, ConfigError, DataError  # noqa: F401

__version__ = "0.1.0"


def load_pretrained(path: str, dtype: str = "float32", step: int | None = None):
    """A ready NNX model from a Hugging Face ERNIE 4.5 directory, an ernie_jax converted checkpoint
    or a training workdir (its newest good checkpoint, or `step`)."""
    from ernie_jax.convert import load_pretrained as _load

    return _load(path, dtype=dtype, step=step)


def save_pretrained(model, path: str, shard_bytes: int = 2 << 30) -> None:
    """Write an ernie_jax model as a Hugging Face directory transformers can load."""
    from ernie_jax.convert import save_pretrained as _save

    _save(model, path, shard_bytes=shard_bytes)


def generate(model, input_ids, **kwargs):
    """New tokens for prompts, with a KV cache: see `ernie_jax.generation.generate`."""
    from ernie_jax.generation import generate as _generate

    return _generate(model, input_ids, **kwargs)
