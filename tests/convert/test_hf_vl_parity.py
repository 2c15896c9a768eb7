"""ERNIE-4.5-VL parity with transformers' Ernie4_5_VLMoeForConditionalGeneration (fp32, tiny random
models): logits for text-only, one image, two images of different sizes and a video; 3D position
ids against `get_rope_index`; ERNIE's video position advance tested as a deliberate difference."""

import numpy as np
import pytest

import ernie_jax
from ernie_jax.model.positions import position_ids
from tests.hf_reference import VL_TOKENS, make_hf_vl_model, moe_token_types

pytest.importorskip("transformers")
pytestmark = pytest.mark.parity
T = VL_TOKENS
MERGE = 2


def _image(grid):
    t, h, w = grid
    n = (t // 2 if t > 1 else 1) * (h // MERGE) * (w // MERGE)
    start, end, ph = (
        (T["video_start_token_id"], T["video_end_token_id"], T["video_token_id"])
        if t > 1
        else (T["image_start_token_id"], T["image_end_token_id"], T["image_token_id"])
    )
    return [start] + [ph] * n + [end]


def _sample(rng, images=(), video=None):
    """Token ids with text around each vision item, pixel arrays and grids."""
    ids = list(rng.integers(3, 99, size=5))
    for g in images:
        ids += _image(g) + list(rng.integers(3, 99, size=3))
    if video is not None:
        ids += _image(video) + list(rng.integers(3, 99, size=4))
    ids = np.array([ids], np.int64)
    pix = (
        np.concatenate([rng.normal(size=(t * h * w, 588)) for t, h, w in images], 0).astype(np.float32)
        if len(images)
        else None
    )
    vid = rng.normal(size=(int(np.prod(video)), 588)).astype(np.float32) if video is not None else None
    return ids, pix, vid


def _types(ids):
    return (ids == T["image_token_id"]) * 1 + (ids == T["video_token_id"]) * 2


def _hf(model, ids, pix=None, grids=None, vid=None, vgrid=None):
    import torch

    kw = dict(
        input_ids=torch.tensor(ids),
        mm_token_type_ids=torch.tensor(_types(ids)),
        moe_mm_token_type_ids=torch.tensor(moe_token_types(ids)),
    )
    if pix is not None:
        kw.update(pixel_values=torch.tensor(pix), image_grid_thw=torch.tensor(grids))
    if vid is not None:
        kw.update(pixel_values_videos=torch.tensor(vid), video_grid_thw=torch.tensor(vgrid))
    model.model.rope_deltas = None
    with torch.no_grad():
        return model(**kw).logits.float().numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf, path = make_hf_vl_model(tmp_path_factory.mktemp("vl"))
    return hf, ernie_jax.load_pretrained(path)


def _check(hf_logits, ours):
    ours = np.asarray(ours.logits)
    assert ours.shape == hf_logits.shape
    np.testing.assert_allclose(ours, hf_logits, atol=1e-5, rtol=0)


def test_text_only(models):
    hf, ours = models
    ids = np.random.default_rng(0).integers(3, 99, size=(2, 11))
    _check(_hf(hf, ids), ours(ids))


def test_one_image(models):
    hf, ours = models
    grids = np.array([[1, 4, 6]])
    ids, pix, _ = _sample(np.random.default_rng(1), images=grids)
    _check(_hf(hf, ids, pix, grids), ours(ids, pixel_values=pix, image_grid_thw=grids))


def test_two_images_of_different_sizes(models):
    hf, ours = models
    grids = np.array([[1, 4, 6], [1, 8, 4]])
    ids, pix, _ = _sample(np.random.default_rng(2), images=grids)
    _check(_hf(hf, ids, pix, grids), ours(ids, pixel_values=pix, image_grid_thw=grids))


def test_video_and_image(models):
    """With transformers' position advance our logits match; ERNIE's advance changes the text
    positions after the video only (checked in test_video_position_advance_follows_spec)."""
    hf, ours = models
    grids, vgrid = np.array([[1, 4, 4]]), np.array([[6, 4, 4]])
    ids, pix, vid = _sample(np.random.default_rng(3), images=grids, video=vgrid[0])
    ref = _hf(hf, ids, pix, grids, vid, vgrid)
    out = ours(
        ids,
        pixel_values=pix,
        image_grid_thw=grids,
        pixel_values_videos=vid,
        video_grid_thw=vgrid,
        video_advance="transformers",
    )
    _check(ref, out)
    spec = np.asarray(
        ours(
            ids, pixel_values=pix, image_grid_thw=grids, pixel_values_videos=vid, video_grid_thw=vgrid
        ).logits
    )
    after = np.nonzero(ids[0] == T["video_end_token_id"])[0][0]
    np.testing.assert_allclose(spec[0, :after], ref[0, :after], atol=1e-5)  # identical up to the video's end
    assert np.abs(spec[0, after:] - ref[0, after:]).max() > 1e-4  # then shifted positions


def test_position_ids_match_get_rope_index_for_images(models):
    import torch

    hf, _ = models
    grids = np.array([[1, 4, 6], [1, 8, 4], [1, 2, 2]])
    ids, _, _ = _sample(np.random.default_rng(4), images=grids)
    ref, _ = hf.model.get_rope_index(
        torch.tensor(ids), torch.tensor(_types(ids)), image_grid_thw=torch.tensor(grids)
    )
    ours = position_ids(_types(ids), grids)
    np.testing.assert_array_equal(np.moveaxis(ours, -1, 0), ref.numpy())


def test_video_position_advance_follows_spec(models):
    """ERNIE (Paddle/vLLM): text after a video continues at max(t, h, w ids) + 1; transformers uses
    max(H', W') and ignores time (transformers ernie4_5_vl_moe get_rope_index; Paddle uses
    max(t, h, w) + 1). Here T' = 3 > H' = W' = 2."""
    import torch

    hf, _ = models
    vgrid = np.array([[6, 4, 4]])
    ids, _, _ = _sample(np.random.default_rng(5), video=vgrid[0])
    ref, _ = hf.model.get_rope_index(
        torch.tensor(ids), torch.tensor(_types(ids)), video_grid_thw=torch.tensor(vgrid)
    )
    ref = np.moveaxis(ref.numpy(), 0, -1)[0]
    ernie = position_ids(_types(ids), video_grid_thw=vgrid)[0]
    as_hf = position_ids(_types(ids), video_grid_thw=vgrid, video_advance="transformers")[0]
    np.testing.assert_array_equal(as_hf, ref)
    vision = np.nonzero(_types(ids)[0] == 2)[0]
    np.testing.assert_array_equal(ernie[: vision[-1] + 1], ref[: vision[-1] + 1])
    assert ernie[vision[-1] + 1, 0] == ernie[vision].max() + 1  # max id + 1
    np.testing.assert_array_equal(
        ernie[vision[-1] + 1 :] - ref[vision[-1] + 1 :], 1
    )  # 3 - 2 = one step later


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_dispatch_modes_agree(models, dispatch, tmp_path):
    """Both dispatch implementations give the transformers logits (capacity large enough)."""
    import dataclasses
    from flax import nnx
    from ernie_jax.convert import model_from_params

    hf, ours = models
    cfg = ours.architecture()
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=dispatch, capacity_factor=8.0))
    model = model_from_params(cfg, nnx.to_pure_dict(nnx.state(ours)))
    grids = np.array([[1, 4, 6]])
    ids, pix, _ = _sample(np.random.default_rng(6), images=grids)
    _check(_hf(hf, ids, pix, grids), model(ids, pixel_values=pix, image_grid_thw=grids))


def test_export_round_trip(models, tmp_path):
    """ours -> HF directory -> transformers loads it -> the same logits."""
    import transformers as Tr

    _, ours = models
    ernie_jax.save_pretrained(ours, str(tmp_path / "export"))
    back = Tr.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    grids = np.array([[1, 4, 6]])
    ids, pix, _ = _sample(np.random.default_rng(7), images=grids)
    _check(_hf(back, ids, pix, grids), ours(ids, pixel_values=pix, image_grid_thw=grids))


def test_cli_round_trip_and_baidu_vision_prefix(models, tmp_path):
    """hf-to-ernie -> orbax -> ernie-to-hf keeps every tensor; Baidu's top-level `vision_model.*`
    keys load like transformers' `model.vision_model.*`."""
    import os
    import shutil
    import subprocess
    import sys
    from ernie_jax.convert.safetensors_io import SafetensorsFile, save_file

    hf, _ = models
    src = str(tmp_path / "hf")
    hf.save_pretrained(src)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for cmd in (
        ["hf-to-ernie", src, str(tmp_path / "orbax")],
        ["ernie-to-hf", str(tmp_path / "orbax"), str(tmp_path / "back")],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "ernie_jax.convert", *cmd], capture_output=True, text=True, env=env
        )
        assert r.returncode == 0, r.stderr
    a, b = (
        SafetensorsFile(f"{src}/model.safetensors"),
        SafetensorsFile(str(tmp_path / "back/model.safetensors")),
    )
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        np.testing.assert_array_equal(a.get(k), b.get(k), err_msg=k)
    baidu = tmp_path / "baidu"
    shutil.copytree(src, baidu)
    save_file(
        {k.removeprefix("model.") if k.startswith("model.vision_model.") else k: a.get(k) for k in a.keys()},
        str(baidu / "model.safetensors"),
    )
    grids = np.array([[1, 4, 6]])
    ids, pix, _ = _sample(np.random.default_rng(8), images=grids)
    _check(
        _hf(hf, ids, pix, grids),
        ernie_jax.load_pretrained(str(baidu))(ids, pixel_values=pix, image_grid_thw=grids),
    )
    _check(
        _hf(hf, ids, pix, grids),
        ernie_jax.load_pretrained(str(tmp_path / "orbax"))(ids, pixel_values=pix, image_grid_thw=grids),
    )
