"""Export a training run: `ernie-to-hf WORKDIR DST [--step N] [--dtype]` and load_pretrained(WORKDIR)
give the trained weights (routing biases included), which transformers loads with equal logits."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import ernie_jax
from ernie_jax.errors import CheckpointError

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "moe.intermediate_size=32",
    "data.seq_len=32",
    "data.batch_size=4",
    "train.steps=4",
    "train.eval_interval=100",
    "checkpoint.interval=2",
    "checkpoint.async_save=false",
    "optimizer.learning_rate=0.01",
]


def _run(module, *args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny MoE run (capacity dispatch, MTP) with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    sets = [a for s in SMALL for a in ("--set", s)]
    r = _run(
        "ernie_jax.train", "--config", "configs/tiny_moe.yaml", "--workdir", str(workdir), "--quiet", *sets
    )
    assert r.returncode == 0, r.stderr
    return str(workdir)


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_exported_run_loads_in_transformers_with_equal_logits(run, tmp_path):
    out = str(tmp_path / "hf")
    r = _run("ernie_jax.convert", "ernie-to-hf", run, out)
    assert r.returncode == 0, r.stderr
    assert "step 4" in r.stdout
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= set(
        os.listdir(out)
    )
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert (gen["temperature"], gen["top_p"], gen["eos_token_id"]) == (0.8, 0.8, 2)
    ours = ernie_jax.load_pretrained(run)
    # training moved the routing biases away from zero, and they reach transformers
    bias = np.asarray(ours.units.moe.mlp.gate.correction_bias[...])
    assert np.abs(bias).max() > 0
    ids = np.random.default_rng(0).integers(5, 4000, (2, 24))
    with torch.no_grad():
        ref = _hf(out)(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).logits), ref, atol=1e-5)
    # the chat template renders what SFT trains on
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == "<s>Be brief.\nUser: hi\nAssistant: "


def test_step_choice_dtype_and_damaged_newest_step(run, tmp_path):
    older = ernie_jax.load_pretrained(run, step=2)
    newer = ernie_jax.load_pretrained(run)
    a, b = (np.asarray(m.embed_tokens.embedding[...]) for m in (older, newer))
    assert not np.array_equal(a, b)
    out = str(tmp_path / "bf16")
    r = _run("ernie_jax.convert", "ernie-to-hf", run, out, "--step", "2", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    emb = hf.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16
    np.testing.assert_allclose(emb.detach().float().numpy(), a, rtol=1e-2, atol=1e-2)
    # a damaged newest step is skipped (and left where it is); the export takes step 2
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    state = os.path.join(copy, "checkpoints", "4", "state")
    victim = max(
        (os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs), key=lambda p: os.path.getsize(p)
    )
    with open(victim, "r+b") as f:
        f.write(b"\0" * 64)
    got = ernie_jax.load_pretrained(copy)
    np.testing.assert_array_equal(np.asarray(got.embed_tokens.embedding[...]), a)
    assert os.path.isdir(os.path.join(copy, "checkpoints", "4"))


def test_bad_export_requests_fail_in_one_line(run, tmp_path):
    r = _run("ernie_jax.convert", "ernie-to-hf", run, str(tmp_path / "x"), "--step", "3")
    assert r.returncode == 2 and "--step 3" in r.stderr and "2, 4" in r.stderr
    os.makedirs(tmp_path / "full")
    (tmp_path / "full" / "f").write_text("x")
    r = _run("ernie_jax.convert", "ernie-to-hf", run, str(tmp_path / "full"))
    assert r.returncode == 2 and "not empty" in r.stderr
    os.makedirs(tmp_path / "empty_run" / "checkpoints")
    with pytest.raises(CheckpointError, match="no checkpoints yet"):
        ernie_jax.load_pretrained(str(tmp_path / "empty_run"))
    r = _run("ernie_jax.convert", "ernie-to-hf", str(tmp_path), str(tmp_path / "y"))
    assert r.returncode == 2 and "neither a training workdir" in r.stderr


@pytest.mark.slow
def test_exported_vl_run_loads_in_transformers_vl_class_with_equal_logits(tmp_path):
    """A tiny VL training run (ViT, adapter, text + vision experts) exported from its workdir loads as
    transformers' Ernie4_5_VLMoeForConditionalGeneration with our logits on an image prompt."""
    from ernie_jax.data.images import load_rgb, preprocess_frames
    from ernie_jax.data.tokenizer import EMBEDDED_DIR

    work = tmp_path / "vl"
    sets = [
        "model.num_layers=2",
        "vision.depth=1",
        "data.seq_len=64",
        "data.batch_size=2",
        "data.max_patches=256",
        "train.steps=2",
        "train.eval_interval=100",
        "checkpoint.interval=2",
        "checkpoint.async_save=false",
    ]
    r = _run(
        "ernie_jax.train",
        "--config",
        "configs/tiny_vl.yaml",
        "--workdir",
        str(work),
        "--quiet",
        *[a for s in sets for a in ("--set", s)],
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = str(tmp_path / "hf")
    r = _run("ernie_jax.convert", "ernie-to-hf", str(work), out)
    assert r.returncode == 0, r.stderr
    hf = transformers.Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ours = ernie_jax.load_pretrained(str(work))
    v = ours.vision_cfg
    pix, grid = preprocess_frames(
        [load_rgb(os.path.join(EMBEDDED_DIR, "mnist", "00007.png"))], max_pixels=12544
    )
    n = grid[1] * grid[2] // 4
    ids = np.array([[1, 300, v.image_start_token_id, *[v.image_token_id] * n, v.image_end_token_id, 52, 800]])
    markers = [v.image_token_id, v.image_start_token_id, v.image_end_token_id]
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pix),
            image_grid_thw=torch.tensor([grid]),
            mm_token_type_ids=torch.tensor((ids == v.image_token_id).astype(np.int64)),
            moe_mm_token_type_ids=torch.tensor(np.isin(ids, markers).astype(np.int64)),
        ).logits.numpy()
    got = np.asarray(ours(ids, pixel_values=pix, image_grid_thw=np.array([grid])).logits)
    np.testing.assert_allclose(got, ref, atol=1e-5)
