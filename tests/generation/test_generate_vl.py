"""VL generation: a batch of prompts with an image and a video (different prompt lengths) decodes
through the KV cache to transformers' greedy `generate`, and to transformers' forward re-run on the
growing sequence at every step: the vision rows reach the cache, new tokens continue the 3D
positions, and a generated start / end marker is routed to the vision experts as a re-run routes it
(transformers' own `generate` routes it as text)."""

import numpy as np
import pytest

import ernie_jax
from tests.hf_reference import VL_TOKENS, make_hf_vl_model, moe_token_types

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

T = VL_TOKENS
PLACEHOLDERS = {T["image_token_id"], T["video_token_id"]}


def _vision(t, h, w):
    """Placeholder run of an image (t=1) or a video (two frames merge into one temporal row)."""
    n = (t // 2 if t > 1 else 1) * (h // 2) * (w // 2)
    kind = "video" if t > 1 else "image"
    return [T[f"{kind}_start_token_id"]] + [T[f"{kind}_token_id"]] * n + [T[f"{kind}_end_token_id"]]


def _hf_inputs(ids, vision):
    ids = torch.tensor([ids])
    return dict(
        input_ids=ids,
        mm_token_type_ids=(ids == T["image_token_id"]) * 1 + (ids == T["video_token_id"]) * 2,
        moe_mm_token_type_ids=torch.tensor(moe_token_types(ids.numpy())),
        **{k: torch.tensor(v) for k, v in vision.items()},
    )


def _hf_greedy(hf, prompt, n, vision):
    hf.model.rope_deltas = None
    with torch.no_grad():
        out = hf.generate(
            **_hf_inputs(prompt, vision), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


def _hf_rerun_greedy(hf, prompt, n, vision):
    ids = list(prompt)
    for _ in range(n):
        hf.model.rope_deltas = None
        with torch.no_grad():
            ids.append(int(hf(**_hf_inputs(ids, vision)).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_with_image_and_video_equals_transformers_and_full_recompute(tmp_path):
    hf, path = make_hf_vl_model(tmp_path, seed=3)
    model = ernie_jax.load_pretrained(path)
    rng = np.random.default_rng(0)
    image, video = np.array([[1, 4, 6]]), np.array([[2, 4, 4]])
    prompts = [
        list(rng.integers(3, 99, 4)) + _vision(*image[0]) + list(rng.integers(3, 99, 2)),
        list(rng.integers(3, 99, 2)) + _vision(*video[0]) + list(rng.integers(3, 99, 6)),
    ]
    pixels = rng.normal(size=(int(np.prod(image)), 588)).astype(np.float32)
    frames = rng.normal(size=(int(np.prod(video)), 588)).astype(np.float32)
    rows = [
        dict(pixel_values=pixels, image_grid_thw=image),
        dict(pixel_values_videos=frames, video_grid_thw=video),
    ]
    n = 8
    got = ernie_jax.generate(
        model, prompts, max_new_tokens=n, temperature=0.0, eos_token_ids=[-1], **rows[0], **rows[1]
    )
    for row, (prompt, vision) in enumerate(zip(prompts, rows)):
        new = _hf_rerun_greedy(hf, prompt, n, vision)
        assert not set(new) & PLACEHOLDERS  # a generated placeholder would be text to us, vision to a re-run
        assert got.tokens[row].tolist() == new
        # transformers' generate routes a generated marker as text: compare up to the first one
        markers = [i for i, t in enumerate(new) if t in T.values()] + [n]
        assert markers[0] >= 3
        assert _hf_greedy(hf, prompt, n, vision)[: markers[0]] == new[: markers[0]]
