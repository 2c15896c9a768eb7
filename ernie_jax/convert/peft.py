"""LoRA adapters <-> PEFT adapter directories (adapter_config.json + adapter_model.safetensors).

Keys follow the per-expert checkpoint layout of the HF key table (`model.layers.3.mlp.experts.5.
gate_proj`), so one table names base weights and adapters alike. PEFT (>= 0.18 with transformers 5)
maps per-expert adapters of ERNIE 4.5 MoE onto transformers' fused 3D expert parameters when it loads
them (its qwen2_moe conversion: A concatenated, B block-diagonal over gate and up), so the written
directory loads with `peft.PeftModel.from_pretrained` onto `Ernie4_5_MoeForCausalLM` as it is.

Our adapter of a kernel W [K, N] (y = x W) is a [K, r], b [r, N]; PEFT's of the same layer (y = x W^T
with W [N, K] in torch) is lora_A [r, K] = a^T, lora_B [N, r] = b^T; the scale alpha / r (or / sqrt r)
is the same number on both sides.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

from ernie_jax.config import Config
from ernie_jax.convert.hf_text import key_table
from ernie_jax.convert.safetensors_io import SafetensorsFile, save_file
from ernie_jax.errors import CheckpointError
from ernie_jax.model.lora import base_config
from ernie_jax.paths import as_path, is_remote, shown

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def adapter_path(param_path: tuple[str, ...]) -> tuple[str, ...]:
    """The adapter module of a base kernel: .../q_proj/kernel -> .../q_proj/lora; .../experts/gate_proj
    -> .../experts/gate_proj_lora."""
    if param_path[-1] == "kernel":
        return param_path[:-1] + ("lora",)
    return param_path[:-1] + (param_path[-1] + "_lora",)


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        if not isinstance(tree, dict) or p not in tree:
            return None
        tree = tree[p]
    return tree


def _table(cfg: Config):
    """(HF module name, our adapter path, stacked index) of every adapted kernel; text models only."""
    if cfg.vision.enabled:
        raise CheckpointError(
            "PEFT adapters are written for text models; export a VL run merged (ernie-to-hf SRC DST "
            "--merge-lora)"
        )
    for e in key_table(base_config(cfg)):
        if e.layout == "T" and e.key.endswith(".weight") and "mlp.gate." not in e.key:
            yield e.key[: -len(".weight")], adapter_path(e.path), e.index


def peft_tensors(cfg: Config, adapters: dict) -> dict[str, np.ndarray]:
    """PEFT state dict (keys without the adapter name) of the pure adapter dict `adapters`."""
    out = {}
    for module, path, index in _table(cfg):
        ab = _get(adapters, path)
        if ab is None:
            continue
        a, b = (np.asarray(ab[k], np.float32)[index] for k in ("a", "b"))
        out[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        out[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return out


def peft_config(cfg: Config, modules: list[str]) -> dict:
    """adapter_config.json. PEFT rewrites the targets of an ERNIE 4.5 MoE model on load: every target
    module named *.gate_proj / up_proj / down_proj is taken for a routed expert and moved onto the fused
    3D expert parameters. Dense FFN and shared-expert projections are therefore named as parameters
    (`target_parameters`: their `.weight`), which it leaves alone; the state-dict keys are the same."""
    lo = cfg.lora
    routed = lambda m: ".mlp.experts." in m
    ffn = lambda m: m.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj") and not routed(m)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lo.rank,
        "lora_alpha": lo.alpha or 2 * lo.rank,
        "use_rslora": lo.rslora,
        # training-only, and PEFT refuses dropout on parameter targets (the experts): written as 0
        "lora_dropout": 0.0,
        # the exact modules adapted (PEFT matches names by suffix): one entry per layer and expert
        "target_modules": sorted(m for m in modules if not ffn(m)),
        "target_parameters": sorted(f"{m}.weight" for m in modules if ffn(m)) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": cfg.checkpoint.init_from or None,
    }


def write_peft(cfg: Config, adapters: dict, dst: str) -> int:
    """Write a PEFT directory at `dst` (atomically: a temporary sibling renamed); returns tensors written."""
    tensors = peft_tensors(cfg, adapters)
    if not tensors:
        raise CheckpointError("the run has no adapters on modules transformers' ERNIE 4.5 model names")
    modules = [k[len(PREFIX) : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")]
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".peft-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS))
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(peft_config(cfg, modules), f, indent=2)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(tensors)


def adapters_from_peft(path: str, cfg: Config, target: dict) -> dict:
    """lora.init_from a PEFT directory: its tensors placed into `target` (the run's adapters, arrays
    with shardings). Rank, alpha and every adapted module must match this run's lora.* settings."""
    if is_remote(path) or not as_path(os.path.join(path, ADAPTER_CONFIG)).is_file():
        raise CheckpointError(
            f"lora.init_from={path} is neither a LoRA training workdir nor a local PEFT directory "
            f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        conf = json.load(f)
    lo = cfg.lora
    want = {"r": lo.rank, "lora_alpha": lo.alpha or 2 * lo.rank, "use_rslora": lo.rslora}
    for key, value in want.items():
        if conf.get(key, False if key == "use_rslora" else None) != value:
            raise CheckpointError(
                f"lora.init_from={path}: {ADAPTER_CONFIG} has {key}={conf.get(key)!r} but this run has "
                f"{value!r}; set lora.rank / lora.alpha / lora.rslora to match"
            )
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise CheckpointError(f"lora.init_from={path} has no {ADAPTER_WEIGHTS}")
    src = SafetensorsFile(weights)
    stored = {k.replace(".default.", "."): k for k in src.keys()}
    host = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), target)
    filled = {id(leaf): 0 for leaf in jax.tree.leaves(host)}
    for module, apath, index in _table(cfg):
        ab = _get(host, apath)
        if ab is None:
            continue
        for name, key in (("a", "lora_A"), ("b", "lora_B")):
            full = f"{PREFIX}{module}.{key}.weight"
            if full not in stored:
                raise CheckpointError(
                    f"lora.init_from={path} has no {full}; its target_modules differ from lora.targets"
                )
            t = np.asarray(src.get(stored[full]), np.float32).T
            if t.shape != ab[name][index].shape:
                raise CheckpointError(
                    f"lora.init_from={path}: {full} has shape {t.T.shape}, this model needs "
                    f"{ab[name][index].T.shape}; the adapter belongs to another model"
                )
            ab[name][index] = t
            filled[id(ab[name])] += 1
    missing = [
        jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(host) if not filled[id(v)]
    ]
    if missing:
        raise CheckpointError(f"lora.init_from={shown(path)} fills no adapter at {missing[0]}")
    return jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), host, target)
