"""ERNIE-4.5-VL checkpoints: config mapping and the ViT / adapter part of the key table.

The decoder keys (heterogeneous MoE layers included) come from `hf_text.key_table`. Keys follow
vLLM models/ernie45_vl_moe.py as transformers writes them (`model.vision_model.*`,
`model.resampler_model.*`); Baidu's original top-level `vision_model.*` is accepted on read.
Both config.json dialects are read: transformers' (`model_type: ernie4_5_vl_moe`, nested
text_config / vision_config) and Baidu's original flat one (list-valued moe_* keys).
"""

from __future__ import annotations

from ernie_jax.config import Config, ModelConfig, MoEConfig, VisionConfig
from ernie_jax.convert.keys import Entry, first_of
from ernie_jax.errors import CheckpointError

VL_MODEL_TYPES = ("ernie4_5_vl_moe", "ernie4_5_moe_vl")
_TOKEN_KEYS = (
    "image_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "video_token_id",
    "video_start_token_id",
    "video_end_token_id",
)


def vision_entries(cfg: Config) -> list[Entry]:
    vm, rs = "model.vision_model", "model.resampler_model"
    out = [Entry(f"{vm}.patch_embed.proj.weight", ("vision_model", "patch_embed", "kernel"), (), "T")]
    blocks = ("vision_model", "blocks")
    for j in range(cfg.vision.depth):
        b = f"{vm}.blocks.{j}"
        for norm in ("norm1", "norm2"):
            for w in ("weight", "bias"):
                out.append(Entry(f"{b}.{norm}.{w}", blocks + (norm, w), (j,), "copy"))
        for hf, ours in (
            ("attn.qkv", ("attn", "qkv")),
            ("attn.proj", ("attn", "proj")),
            ("mlp.fc1", ("fc1",)),
            ("mlp.fc2", ("fc2",)),
        ):
            out.append(Entry(f"{b}.{hf}.weight", blocks + ours + ("kernel",), (j,), "T"))
            out.append(Entry(f"{b}.{hf}.bias", blocks + ours + ("bias",), (j,), "copy"))
    for w in ("weight", "bias"):
        out.append(Entry(f"{vm}.ln.{w}", ("vision_model", "ln", w), (), "copy"))
    for mlp in ("spatial_linear", "temporal_linear"):
        for idx, ours in (("0", "fc1"), ("2", "fc2")):
            out.append(Entry(f"{rs}.{mlp}.{idx}.weight", ("resampler", mlp, ours, "kernel"), (), "T"))
            out.append(Entry(f"{rs}.{mlp}.{idx}.bias", ("resampler", mlp, ours, "bias"), (), "copy"))
        for w in ("weight", "bias"):
            out.append(Entry(f"{rs}.{mlp}.3.{w}", ("resampler", mlp, "ln", w), (), "copy"))
    out.append(Entry(f"{rs}.mlp.weight", ("resampler", "mlp", "kernel"), (), "T"))
    out.append(Entry(f"{rs}.mlp.bias", ("resampler", "mlp", "bias"), (), "copy"))
    out.append(Entry(f"{rs}.after_norm.weight", ("resampler", "after_norm", "weight"), (), "copy"))
    return out


def _sparse_range(types: list[str], source: str) -> tuple[int, int]:
    sparse = [i for i, t in enumerate(types) if t == "sparse"]
    if not sparse or sparse != list(range(sparse[0], sparse[-1] + 1)):
        raise CheckpointError(
            f"{source}: mlp_layer_types must be one contiguous run of 'sparse' layers, got {types}"
        )
    return sparse[0], sparse[-1]


def config_from_hf_vl(hf: dict, *, dtype: str = "float32", source: str = "config.json") -> Config:
    """Our Config from a VL config.json (either dialect)."""
    if "text_config" in hf:  # transformers
        t, vis = hf["text_config"], hf.get("vision_config") or {}
        layers = t["num_hidden_layers"]
        start, end = _sparse_range(t.get("mlp_layer_types") or ["dense"] + ["sparse"] * (layers - 1), source)
        rope = t.get("rope_parameters") or {}
        theta, section = float(rope.get("rope_theta", 500000.0)), rope.get("mrope_section", [22, 22, 20])
        inter = t.get("moe_intermediate_size") or [1536, 512]
        experts = [t.get("moe_num_experts", 64)] * 2
        vrope = (vis.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        vision = dict(
            depth=vis.get("depth", 32),
            hidden_size=vis.get("hidden_size", 1280),
            num_heads=vis.get("num_heads", 16),
            intermediate_size=vis.get("intermediate_size", 5120),
            patch_size=vis.get("patch_size", 14),
            in_channels=vis.get("in_channels", 3),
            spatial_merge=vis.get("spatial_merge_size", 2),
            temporal_merge=vis.get("temporal_merge_size", 2),
            layer_norm_eps=vis.get("rms_norm_eps", 1e-6),
            rope_theta=float(vrope),
        )
        if section[0] != section[1]:
            raise CheckpointError(
                f"{source}: mrope_section {section} must give h and w the same number of frequencies"
            )
        t_freqs = section[2]
    else:  # Baidu original, flat
        t, vis = hf, hf.get("vision_config") or {}
        layers = t["num_hidden_layers"]
        start = first_of(t.get("moe_layer_start_index"), 1, min)
        end = first_of(t.get("moe_layer_end_index"), layers - 1, max)
        end = min(end if end >= 0 else layers - 1, layers - 1)
        theta, t_freqs = float(t.get("rope_theta", 500000.0)), t.get("freq_allocation", 20)
        inter = t.get("moe_intermediate_size") or [1536, 512]
        experts = t.get("moe_num_experts") or [64, 64]
        embed = vis.get("embed_dim", 1280)
        vision = dict(
            depth=vis.get("depth", 32),
            hidden_size=embed,
            num_heads=vis.get("num_heads", 16),
            intermediate_size=int(embed * vis.get("mlp_ratio", 4)),
            patch_size=vis.get("patch_size", 14),
            in_channels=vis.get("in_channels", 3),
            spatial_merge=t.get("spatial_conv_size", 2),
            temporal_merge=t.get("temporal_conv_size", 2),
        )
        hf = {**hf, "image_token_id": hf.get("im_patch_id", 100295)}
    inter = inter if isinstance(inter, (list, tuple)) else [inter, inter]
    experts = experts if isinstance(experts, (list, tuple)) else [experts, experts]
    heads = t["num_attention_heads"]
    model = ModelConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or t["hidden_size"] // heads,
        intermediate_size=t["intermediate_size"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-5),
        rope_theta=theta,
        max_position_embeddings=t.get("max_position_embeddings", 131072),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", t.get("tie_word_embeddings", True))),
        dtype=dtype,
        pad_token_id=t.get("pad_token_id") or 0,
        bos_token_id=t.get("bos_token_id") or 1,
        eos_token_id=first_of(t.get("eos_token_id"), 2) or 2,
        init_std=t.get("initializer_range", 0.02),
    )
    moe = MoEConfig(
        num_experts=experts[0],
        top_k=first_of(t.get("moe_k"), 6),
        intermediate_size=inter[0],
        num_shared_experts=t.get("moe_num_shared_experts", 0) or 0,
        layer_start=start,
        layer_end=end,
        layer_interval=1,
        norm_min=t.get("moe_norm_min", 1e-12),
        vision_num_experts=experts[1],
        vision_intermediate_size=inter[1],
    )
    tokens = {k: hf[k] for k in _TOKEN_KEYS if hf.get(k) is not None}
    cfg = Config(
        model=model,
        moe=moe,
        vision=VisionConfig(enabled=True, rope_t_frequencies=t_freqs, **vision, **tokens),
    )
    return cfg


def config_to_hf_vl(cfg: Config) -> dict:
    """config.json for transformers' Ernie4_5_VLMoeForConditionalGeneration."""
    m, e, v = cfg.model, cfg.moe, cfg.vision
    if (
        e.vision_num_experts != e.num_experts
        or e.layer_interval != 1
        or (e.vision_top_k or e.top_k) != e.top_k
    ):
        raise CheckpointError(
            "the Hugging Face VL layout needs moe.vision_num_experts == moe.num_experts, "
            "moe.layer_interval == 1 and moe.vision_top_k == moe.top_k"
        )
    end = m.num_layers - 1 if e.layer_end == -1 else e.layer_end
    hw = (m.head_dim // 2 - v.rope_t_frequencies) // 2
    types = ["sparse" if e.layer_start <= i <= end else "dense" for i in range(m.num_layers)]
    text = {
        "model_type": "ernie4_5_vl_moe_text",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.intermediate_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.rms_norm_eps,
        "initializer_range": m.init_std,
        "use_bias": False,
        "tie_word_embeddings": m.tie_word_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": m.rope_theta,
            "mrope_section": [hw, hw, v.rope_t_frequencies],
        },
        "moe_intermediate_size": [e.intermediate_size, e.vision_intermediate_size],
        "moe_k": e.top_k,
        "moe_num_experts": e.num_experts,
        "moe_num_shared_experts": e.num_shared_experts,
        "moe_norm_min": e.norm_min,
        "mlp_layer_types": types,
        "pad_token_id": m.pad_token_id,
        "bos_token_id": m.bos_token_id,
        "eos_token_id": m.eos_token_id,
    }
    vision = {
        "model_type": "ernie4_5_vl_moe_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "hidden_act": "quick_gelu",
        "in_channels": v.in_channels,
        "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge,
        "temporal_merge_size": v.temporal_merge,
        "rms_norm_eps": v.layer_norm_eps,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    return {
        "model_type": "ernie4_5_vl_moe",
        "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": m.tie_word_embeddings,
        "dtype": "float32",
        **{k: getattr(v, k) for k in _TOKEN_KEYS},
    }
