"""Hugging Face <-> ernie_jax checkpoint conversion (text models)."""

from ernie_jax.convert.convert import (  # noqa: F401
    ernie_to_hf,
    hf_to_ernie,
    load_pretrained,
    model_from_params,
    read_hf_params,
    restore_params,
    save_params,
    save_pretrained,
)
