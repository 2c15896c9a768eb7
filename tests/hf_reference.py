"""Tiny random Hugging Face ERNIE 4.5 models saved in the real on-disk format."""
from __future__ import annotations

import numpy as np


def make_hf_model(tmp_path, *, moe=True, tie=True, shared=1, start=1, interval=1, experts=4, top_k=2, layers=3,
                  bias_scale=0.0, seed=0, vocab=97):
    import torch
    import transformers as T
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie,
                  initializer_range=0.2)
    if moe:
        cfg = T.Ernie4_5_MoeConfig(**common, moe_intermediate_size=24, moe_k=top_k, moe_num_experts=experts,
                                   moe_num_shared_experts=shared, moe_layer_start_index=start,
                                   moe_layer_interval=interval)
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
