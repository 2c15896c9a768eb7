"""Loading: YAML with `base:` inheritance, `--set a.b=c` overrides, then the checks.

cfg = load_config("configs/tiny_moe.yaml", overrides=["train.steps=10", "moe.top_k=2"])
"""

from __future__ import annotations

import os

import yaml

from ernie_jax.config.checks import validate
from ernie_jax.config.schema import Config, _apply_override, from_dict
from ernie_jax.errors import ConfigError


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (following `base:` links), apply `a.b=c` overrides, validate."""
    raw = _read_yaml_tree(os.fspath(path)) if path else {}
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def _read_yaml_tree(path: str, seen: tuple[str, ...] = ()) -> dict:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
    if path in seen:
        raise ConfigError(f"config {path}: `base:` chain loops back to itself; remove the cycle")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config {path} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config {path} must be a mapping of sections (model:, moe:, ...), got {type(raw).__name__}"
        )
    if not raw:  # it would silently train the 360M-parameter defaults
        raise ConfigError(
            f"config {path} is empty; give it sections (model:, data:, ...) or `base: tiny_moe.yaml` "
            f"to start from a shipped config"
        )
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_yaml_tree(os.path.join(os.path.dirname(path), base), seen + (path,))
    _deep_merge(merged, raw)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v
