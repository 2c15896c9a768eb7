"""Hugging Face ERNIE 4.5 text checkpoints (-PT layout) <-> ernie_jax params.

One table (`key_table`) lists every HF tensor with the ernie_jax param it fills: a path in the
pure state dict, an index into the stacked axes, and a layout change. Import and export both walk
that table, so the two directions cannot disagree. Keys follow vLLM models/ernie45_moe.py and
transformers' conversion_mapping.py.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from ernie_jax.config import Config, ModelConfig, MoEConfig, from_dict, layer_plan, to_dict, validate
from ernie_jax.convert.hf_vl import VL_MODEL_TYPES, config_from_hf_vl, config_to_hf_vl, vision_entries
from ernie_jax.convert.keys import Entry, first_of
from ernie_jax.convert.safetensors_io import SafetensorsFile
from ernie_jax.errors import CheckpointError, ConfigError
from ernie_jax.paths import is_remote

TEXT_MODEL_TYPES = ("ernie4_5", "ernie4_5_moe")


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, *, dtype: str = "float32", source: str = "config.json") -> Config:
    """Build our Config (model + moe[, vision]) from an ERNIE 4.5 config.json; a missing key or a
    value of the wrong type is one CheckpointError naming it."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source} must hold a JSON object; re-download it")
    build = config_from_hf_vl if hf.get("model_type") in VL_MODEL_TYPES else _text_config_from_hf
    try:
        cfg = build(hf, dtype=dtype, source=source)
        # the builders take values as found; the typed round trip names any of the wrong type
        cfg = from_dict(to_dict(cfg))
        validate(cfg)
        return cfg
    except CheckpointError:
        raise
    except ConfigError as e:  # from the round trip or the cross-field checks: names our key
        raise CheckpointError(f"{source} describes an invalid model ({e}); fix config.json") from None
    except KeyError as e:
        raise CheckpointError(
            f"{source} has no {e.args[0]!r}, which an ERNIE 4.5 config.json needs; "
            f"re-download it or add the key"
        ) from None
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{source} holds a value of the wrong type ({e}); fix config.json") from None


def _text_config_from_hf(hf: dict, *, dtype: str, source: str) -> Config:
    mt = hf.get("model_type")
    if mt not in TEXT_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {mt!r} is not an ERNIE 4.5 text model "
            f"(expected one of {', '.join(TEXT_MODEL_TYPES)})"
        )
    rope = hf.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 500000.0)))
    heads = hf["num_attention_heads"]
    model = ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        max_position_embeddings=hf.get("max_position_embeddings", 131072),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dtype=dtype,
        mtp_depth=int(hf.get("num_nextn_predict_layers", 0) or 0),
        pad_token_id=hf.get("pad_token_id") or 0,
        bos_token_id=hf.get("bos_token_id") or 1,
        eos_token_id=first_of(hf.get("eos_token_id"), 2),
        init_std=hf.get("initializer_range", 0.02),
    )
    moe = MoEConfig()
    if mt == "ernie4_5_moe":
        experts = first_of(hf.get("moe_num_experts"), 0)
        moe = MoEConfig(
            num_experts=experts,
            top_k=hf.get("moe_k", 2),
            intermediate_size=first_of(hf.get("moe_intermediate_size"), 0),
            num_shared_experts=hf.get("moe_num_shared_experts", 0) or 0,
            layer_start=first_of(hf.get("moe_layer_start_index"), 1, min),
            layer_end=first_of(hf.get("moe_layer_end_index"), -1, max),
            layer_interval=hf.get("moe_layer_interval", 1),
            norm_min=hf.get("moe_norm_min", 1e-12),
        )
    return Config(model=model, moe=moe)


def config_to_hf(cfg: Config) -> dict:
    """config.json for transformers' Ernie4_5ForCausalLM / Ernie4_5_MoeForCausalLM (or the VL model)."""
    m, e = cfg.model, cfg.moe
    if cfg.vision.enabled:
        return config_to_hf_vl(cfg)
    hf = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "intermediate_size": m.intermediate_size,
        "rms_norm_eps": m.rms_norm_eps,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": m.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "rope_theta": m.rope_theta,
        "use_bias": False,
        "pad_token_id": m.pad_token_id,
        "bos_token_id": m.bos_token_id,
        "eos_token_id": m.eos_token_id,
        "initializer_range": m.init_std,
        "dtype": "float32",
        "num_nextn_predict_layers": m.mtp_depth,
    }
    if e.num_experts:
        end = m.num_layers - 1 if e.layer_end == -1 else e.layer_end
        hf.update(
            model_type="ernie4_5_moe",
            architectures=["Ernie4_5_MoeForCausalLM"],
            moe_num_experts=e.num_experts,
            moe_k=e.top_k,
            moe_intermediate_size=e.intermediate_size,
            moe_num_shared_experts=e.num_shared_experts,
            moe_layer_start_index=e.layer_start,
            moe_layer_end_index=end,
            moe_layer_interval=e.layer_interval,
            moe_norm_min=e.norm_min,
            moe_use_aux_free=True,
        )
    else:
        hf.update(model_type="ernie4_5", architectures=["Ernie4_5ForCausalLM"])
    return hf


# ----------------------------------------------------------------------------- key table

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN = ("gate_proj", "up_proj", "down_proj")


def _layer_entries(prefix: str, path: tuple, index: tuple, moe: bool, cfg: Config) -> Iterator[Entry]:
    for norm in ("input_layernorm", "post_attention_layernorm"):
        yield Entry(f"{prefix}.{norm}.weight", path + (norm, "weight"), index, "copy")
    for p in _ATTN:
        yield Entry(f"{prefix}.self_attn.{p}.weight", path + ("self_attn", p, "kernel"), index, "T")
    if not moe:
        for p in _FFN:
            yield Entry(f"{prefix}.mlp.{p}.weight", path + ("mlp", p, "kernel"), index, "T")
        return
    mlp = path + ("mlp",)
    bias_key = f"{prefix}.mlp.moe_statics.e_score_correction_bias"
    if cfg.moe.vision_num_experts:
        # VL -PT layout (vLLM models/ernie45_vl_moe.py): routers stored [H, E] (ours already), bias [2, E],
        # text experts 0..E-1 then vision experts E..E+E_v-1
        yield Entry(f"{prefix}.mlp.gate.weight", mlp + ("gate", "kernel"), index, "copy")
        yield Entry(f"{prefix}.mlp.gate.weight_1", mlp + ("vision_gate", "kernel"), index, "copy")
        yield Entry(bias_key, mlp + ("gate", "correction_bias"), index, "copy", part=0)
        yield Entry(bias_key, mlp + ("vision_gate", "correction_bias"), index, "copy", part=1)
    else:
        yield Entry(f"{prefix}.mlp.gate.weight", mlp + ("gate", "kernel"), index, "T")
        yield Entry(bias_key, mlp + ("gate", "correction_bias"), index, "row")
    for e in range(cfg.moe.num_experts):
        for p in _FFN:
            yield Entry(f"{prefix}.mlp.experts.{e}.{p}.weight", mlp + ("experts", p), index + (e,), "T")
    for e in range(cfg.moe.vision_num_experts):
        for p in _FFN:
            yield Entry(
                f"{prefix}.mlp.experts.{cfg.moe.num_experts + e}.{p}.weight",
                mlp + ("vision_experts", p),
                index + (e,),
                "T",
            )
    if cfg.moe.num_shared_experts:
        for p in _FFN:
            yield Entry(
                f"{prefix}.mlp.shared_experts.{p}.weight", mlp + ("shared_experts", p, "kernel"), index, "T"
            )


def key_table(cfg: Config) -> list[Entry]:
    """Every tensor of the HF -PT layout for this config, in checkpoint order."""
    plan = layer_plan(cfg)
    out = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), (), "copy")]
    for i in range(cfg.model.num_layers):
        stack, j, slot = plan.locate(i)
        if stack == "units" and slot < plan.dense_per_unit:
            path, index, moe = ("units", "dense"), (j, slot), False
        elif stack == "units":
            path, index, moe = ("units", "moe"), (j,), True
        else:
            path, index, moe = (stack,), (j,), False
        out += _layer_entries(f"model.layers.{i}", path, index, moe, cfg)
    out.append(Entry("model.norm.weight", ("norm", "weight"), (), "copy"))
    if not cfg.model.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), (), "T"))
    if cfg.vision.enabled:
        out += vision_entries(cfg)
    for d in range(cfg.model.mtp_depth):
        out.append(Entry(f"model.mtp_emb_norm.{d}.weight", ("mtp", "emb_norm", "weight"), (d,), "copy"))
        out.append(Entry(f"model.mtp_hidden_norm.{d}.weight", ("mtp", "hidden_norm", "weight"), (d,), "copy"))
        out.append(Entry(f"model.mtp_linear_proj.{d}.weight", ("mtp", "linear_proj", "kernel"), (d,), "T"))
        out += _layer_entries(f"model.mtp_block.{d}", ("mtp", "block"), (d,), False, cfg)
    return out


def to_ours(t: np.ndarray, layout: str) -> np.ndarray:
    return t.T if layout == "T" else (t.reshape(-1) if layout == "row" else t)


def to_hf(t: np.ndarray, layout: str) -> np.ndarray:
    return t.T if layout == "T" else (t.reshape(1, -1) if layout == "row" else t)


# ----------------------------------------------------------------------------- reading a HF directory


class HFCheckpoint:
    """A Hugging Face model directory: config.json + model.safetensors or sharded + index json."""

    def __init__(self, path: str):
        if is_remote(path):  # safetensors are memory-mapped: they must be on a local disk
            raise CheckpointError(
                f"{path}: a Hugging Face directory is read memory-mapped from local disk; copy it "
                f"first (e.g. gcloud storage cp -r {path} /tmp/) and pass the local copy"
            )
        self.path = path
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"{path} has no config.json: pass a Hugging Face model directory")
        try:
            with open(cfg_path) as f:
                self.config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); fix or re-download it") from None
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            weight_map = None
        else:
            raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
        self._files: dict[str, SafetensorsFile] = {}
        if weight_map is None:
            f = self._open("model.safetensors")
            weight_map = {k: "model.safetensors" for k in f.keys()}
        # Baidu's VL checkpoints keep the ViT at the top level (`vision_model.*`)
        self._stored = {"model." + k: k for k in weight_map if k.startswith("vision_model.")}
        self.weight_map = {**weight_map, **{k: weight_map[v] for k, v in self._stored.items()}}

    def _open(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            full = os.path.join(self.path, name)
            if not os.path.isfile(full):
                raise CheckpointError(
                    f"shard {full} named in the index is missing; re-download the checkpoint"
                )
            self._files[name] = SafetensorsFile(full)
        return self._files[name]

    def get(self, key: str) -> np.ndarray:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {key} is missing from the checkpoint")
        return self._open(self.weight_map[key]).get(self._stored.get(key, key))

    def keys_by_file(self, keys) -> list[str]:
        """Order keys so each shard is read in one pass (keeps the page cache warm, one file at a time)."""
        return sorted(keys, key=lambda k: (self.weight_map.get(k, ""), k))
