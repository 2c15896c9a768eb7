"""Image preprocessing and the multimodal pipeline: HF-equal patches, bad images skipped and
counted, text-only targets, resumable iterator state."""

import json
import os

import numpy as np
from PIL import Image

from ernie_jax.config import load_config
from ernie_jax.data.images import patchify, preprocess_frames, sample_frames, smart_resize
from ernie_jax.data.multimodal import load_multimodal, packed_multimodal_batches, read_samples


def test_smart_resize_bounds_and_factor():
    for h, w in [(28, 28), (100, 37), (1000, 3000), (56, 560)]:
        rh, rw = smart_resize(h, w, 28, 56 * 56, 28 * 28 * 64)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 56 * 56 <= rh * rw <= 28 * 28 * 64
        assert abs(rh / rw - h / w) / (h / w) < 0.5


def test_patches_match_transformers_processor():
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeImageProcessorPil,
    )

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8))  # already a multiple of 28
    ref = Ernie4_5_VLMoeImageProcessorPil()(images=[img], return_tensors="np")
    ours, grid = preprocess_frames([img])
    assert tuple(ref["image_grid_thw"][0]) == grid == (1, 4, 6)
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5)


def test_patchify_window_order():
    x = np.arange(4 * 4, dtype=np.float32).reshape(1, 4, 4, 1).repeat(1, -1)
    p = patchify(x, patch=1, merge=2)[:, 0]
    np.testing.assert_array_equal(p, [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])


def test_sample_frames_even_and_uniform():
    assert sample_frames(10, 4) == [0, 3, 6, 9]
    assert sample_frames(7, 16) == [0, 1, 2, 4, 5, 6][: len(sample_frames(7, 16))]
    assert len(sample_frames(7, 16)) == 6
    assert sample_frames(1, 16) == [0, 0]


def _write_set(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(tmp_path / "ok.png")
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(tmp_path / "tiny.png")
    Image.fromarray(rng.random((28, 28)).astype(np.float32), "F").save(tmp_path / "float.tiff")
    lines = [
        {"content": [{"image": "ok.png"}, {"text": "a digit"}]},
        {"image": "ok.jpg", "text": "a photo"},
        {"content": [{"video": ["ok.png", "ok.png", "ok.png"]}, {"text": "a clip"}]},
        {"content": [{"image": "corrupt.png"}, {"text": "x"}]},
        {"content": [{"image": "tiny.png"}, {"text": "x"}]},
        {"content": [{"image": "float.tiff"}, {"text": "x"}]},
        {"content": [{"image": "missing.png"}, {"text": "x"}]},
        {"content": [{"text": "word " * 400}]},
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    return str(path)


def _cfg(source, **extra):
    sets = [
        f"data.source={source}",
        "data.batch_size=2",
        "data.max_patches=256",
        "data.seq_len=64",
        "data.eval_fraction=0",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config("configs/tiny_vl.yaml", sets)


def test_bad_samples_skipped_and_counted(tmp_path):
    cfg = _cfg(_write_set(tmp_path), **{"data.batch_size": 1, "data.max_patches": 128})
    data = load_multimodal(cfg)
    assert data.stats.bad_json == 1 and data.stats.samples == 8
    it = packed_multimodal_batches(data.train, data.tokenizer, cfg, data.stats, seed=0, repeat=False)
    batches = list(it)
    s = data.stats
    assert (s.bad_image, s.missing_file, s.too_long) == (3, 1, 1), s.summary()
    ids = np.concatenate([b["input_ids"].ravel() for b in batches])
    v = cfg.vision
    # 28x28 -> 56x56 (4 tokens), 30x40 -> 56x84 (6 tokens), 3 frames -> 2 frames of 56x56 (4 tokens)
    assert (ids == v.image_token_id).sum() == 4 + 6 and (ids == v.video_token_id).sum() == 4


def test_batch_layout_and_text_only_targets(tmp_path):
    cfg = _cfg(_write_set(tmp_path))
    data = load_multimodal(cfg)
    b = next(iter(packed_multimodal_batches(data.train, data.tokenizer, cfg, data.stats, seed=0)))
    v = cfg.vision
    assert b["positions"].shape == (2, 64, 3) and b["patches"].shape == (256, 588)
    placeholder = np.isin(b["labels"], [v.image_token_id, v.video_token_id])
    assert not (b["loss_mask"] * placeholder).any()  # vision targets carry no loss
    assert b["loss_mask"].sum() > 0
    n_img = (b["input_ids"] == v.image_token_id).sum() + (b["input_ids"] == v.video_token_id).sum()
    assert b["row_valid"].sum() == n_img  # one adapter row per placeholder
    assert (b["frame_ids"] > 0).sum() == 4 * n_img if not (b["input_ids"] == v.video_token_id).any() else True


def test_iterator_state_resumes_exactly(tmp_path):
    cfg = load_config("configs/tiny_vl.yaml", ["data.batch_size=2", "data.max_patches=512"])
    data = load_multimodal(cfg)
    it = iter(packed_multimodal_batches(data.train, data.tokenizer, cfg, data.stats, seed=3))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expect = [next(it) for _ in range(2)]
    it2 = iter(packed_multimodal_batches(data.train, data.tokenizer, cfg, data.stats, seed=3))
    it2.set_state(state)
    for want in expect:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_embedded_set_reads():
    samples, stats = read_samples("embedded")
    assert stats.samples == 1250 and stats.bad_json == 0
    assert os.path.isfile(os.path.join(samples[0][0], "00000.png"))


def test_start_up_counts_missing_files_and_bad_images_warn_once(tmp_path, caplog):
    cfg = _cfg(_write_set(tmp_path), **{"data.batch_size": 1, "data.max_patches": 128})
    data = load_multimodal(cfg)
    summary = data.stats.summary()
    assert data.stats.missing_at_start == 1 and "1 naming missing image files" in summary, summary
    assert "0 unusable images" not in summary and "counted in the data_skipped_* metrics" in summary
    assert any("missing.png" in r.getMessage() for r in caplog.records)
    caplog.clear()
    for _ in range(3):  # three epochs over the set: one warning per bad file, counts go on
        list(packed_multimodal_batches(data.train, data.tokenizer, cfg, data.stats, seed=0, repeat=False))
    corrupt = [r for r in caplog.records if "corrupt.png" in r.getMessage()]
    assert len(corrupt) == 1 and data.stats.bad_image >= 9
