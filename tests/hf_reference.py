"""Tiny random Hugging Face ERNIE 4.5 models saved in the real on-disk format."""

from __future__ import annotations

import numpy as np


def make_hf_model(
    tmp_path,
    *,
    moe=True,
    tie=True,
    shared=1,
    start=1,
    interval=1,
    experts=4,
    top_k=2,
    layers=3,
    bias_scale=0.0,
    seed=0,
    vocab=97,
):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    if moe:
        cfg = T.Ernie4_5_MoeConfig(
            **common,
            moe_intermediate_size=24,
            moe_k=top_k,
            moe_num_experts=experts,
            moe_num_shared_experts=shared,
            moe_layer_start_index=start,
            moe_layer_interval=interval,
        )
        model = T.Ernie4_5_MoeForCausalLM(cfg)
        if bias_scale:
            g = torch.Generator().manual_seed(seed + 1)
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    b = layer.mlp.gate.moe_statics.e_score_correction_bias
                    b.data = torch.rand(b.shape, generator=g) * bias_scale
    else:
        model = T.Ernie4_5ForCausalLM(T.Ernie4_5Config(**common))
    model.eval()
    path = str(tmp_path / "hf")
    model.save_pretrained(path)
    return model, path


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(input_ids=torch.tensor(ids), **kw).logits.float().numpy()


# token ids of the tiny VL models (inside the 128-token vocab)
VL_TOKENS = dict(
    image_token_id=100,
    image_start_token_id=101,
    image_end_token_id=102,
    video_token_id=103,
    video_start_token_id=104,
    video_end_token_id=105,
)


def make_hf_vl_model(tmp_path, *, seed=0, shared=1, bias_scale=0.3, tie=True, vocab=128, tokens=VL_TOKENS):
    """A tiny random Ernie4_5_VLMoeForConditionalGeneration (text + vision experts, 2-layer ViT)
    with nonzero correction biases, saved with save_pretrained."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.Ernie4_5_VLMoeConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            moe_intermediate_size=[24, 8],
            moe_k=2,
            moe_num_experts=4,
            moe_num_shared_experts=shared,
            initializer_range=0.2,
            tie_word_embeddings=tie,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [3, 3, 2]},
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            num_heads=2,
            intermediate_size=32,
            initializer_range=0.2,
            rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
        ),
        tie_word_embeddings=tie,
        **tokens,
    )
    model = T.Ernie4_5_VLMoeForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # non-trivial norm scales and linear biases
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for layer in model.model.language_model.layers:
            if hasattr(layer.mlp, "text_moe"):
                for moe in (layer.mlp.text_moe, layer.mlp.vision_moe):
                    b = moe.gate.moe_statics.e_score_correction_bias
                    b.data = torch.rand(b.shape, generator=g) * bias_scale
    model.eval()
    path = str(tmp_path / "hf_vl")
    model.save_pretrained(path)
    return model, path


def moe_token_types(ids: np.ndarray) -> np.ndarray:
    t = VL_TOKENS
    img = np.isin(ids, [t["image_token_id"], t["image_start_token_id"], t["image_end_token_id"]])
    vid = np.isin(ids, [t["video_token_id"], t["video_start_token_id"], t["video_end_token_id"]])
    return img * 1 + vid * 2
