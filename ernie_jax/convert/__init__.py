"""Hugging Face <-> ernie_jax checkpoint conversion (text models)."""

from ernie_jax.convert.convert import ernie_to_hf, hf_to_ernie, load_pretrained  # noqa: F401
from ernie_jax.convert.hf_io import read_hf_params, save_pretrained  # noqa: F401
from ernie_jax.convert.param_dir import model_from_params, restore_params, save_params  # noqa: F401
