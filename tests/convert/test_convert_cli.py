"""The conversion CLI both ways, and bad checkpoints: one clear error naming the tensor, nothing at DST."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import ernie_jax
from ernie_jax.convert import hf_to_ernie, load_pretrained
from ernie_jax.convert.hf_text import key_table
from ernie_jax.convert.param_dir import read_our_config
from ernie_jax.convert.safetensors_io import SafetensorsFile, save_file
from ernie_jax.errors import CheckpointError
from tests.hf_reference import hf_logits, make_hf_model

pytest.importorskip("transformers")


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "ernie_jax.convert", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_round_trip(tmp_path):
    hf, src = make_hf_model(tmp_path, shared=2, tie=False)
    ours = str(tmp_path / "ours")
    r = _run("hf-to-ernie", src, ours, "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "converting" in r.stdout and os.path.isdir(os.path.join(ours, "params"))
    model = load_pretrained(ours)
    ids = np.random.default_rng(0).integers(3, 97, (2, 8))
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(ids, jnp.int32)).logits), hf_logits(hf, ids), atol=1e-5
    )
    back = str(tmp_path / "back")
    r = _run("ernie-to-hf", ours, back)
    assert r.returncode == 0, r.stderr
    import transformers as T

    reloaded = T.Ernie4_5_MoeForCausalLM.from_pretrained(back).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))


def test_existing_destination_is_never_overwritten(tmp_path):
    _, src = make_hf_model(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    r = _run("hf-to-ernie", src, str(dst))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (dst / "keep.txt").read_text() == "precious"


def _corrupt(tmp_path, how):
    _, src = make_hf_model(tmp_path)
    st = os.path.join(src, "model.safetensors")
    if how == "truncated":
        with open(st, "r+b") as f:
            f.truncate(os.path.getsize(st) - 100)
    elif how == "garbage":
        with open(st, "wb") as f:
            f.write(b"\x00" * 64)
    elif how in ("missing", "shape"):
        f = SafetensorsFile(st)
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
        key = "model.layers.1.mlp.experts.3.up_proj.weight"
        if how == "missing":
            del tensors[key]
        else:
            tensors[key] = tensors[key][:, :-1]
        del f
        save_file(tensors, st)
    elif how in ("model_type", "no_key", "wrong_type"):
        cfg = json.load(open(os.path.join(src, "config.json")))
        if how == "model_type":
            cfg["model_type"] = "llama"
        elif how == "no_key":
            del cfg["hidden_size"]
        else:
            cfg["num_hidden_layers"] = "three"
        json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    return src


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("truncated", "is truncated"),
        ("garbage", "not a readable safetensors file"),
        ("missing", "model.layers.1.mlp.experts.3.up_proj.weight is missing"),
        ("shape", "model.layers.1.mlp.experts.3.up_proj.weight has shape (24, 31), expected (24, 32)"),
        ("model_type", "model_type 'llama' is not an ERNIE 4.5 text model"),
        ("no_key", "config.json has no 'hidden_size', which an ERNIE 4.5 config.json needs"),
        ("wrong_type", "model.num_layers='three' must be an integer"),
    ],
)
def test_bad_checkpoints(tmp_path, how, fragment):
    src = _corrupt(tmp_path, how)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        hf_to_ernie(src, str(dst), quiet=True)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not dst.exists()
    assert not [
        p for p in os.listdir(tmp_path) if p.startswith("out.partial") or p.startswith(".ernie-convert")
    ]
    r = _run("hf-to-ernie", src, str(dst))
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr


def test_unwritable_destination_is_found_before_any_tensor_is_read(tmp_path, monkeypatch):
    from ernie_jax.convert import convert

    _, src = make_hf_model(tmp_path)
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(
        convert, "read_hf_params", lambda *a, **k: pytest.fail("tensors read before the check")
    )
    with pytest.raises(CheckpointError, match="a_file is a file, not a directory"):
        hf_to_ernie(src, str(tmp_path / "a_file" / "out"), quiet=True)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    if not os.access(ro, os.W_OK):  # root writes anywhere: the check is then the probe file's
        with pytest.raises(CheckpointError, match="cannot write in"):
            hf_to_ernie(src, str(ro / "out"), quiet=True)
    assert not os.listdir(ro)


def test_load_pretrained_api(tmp_path):
    hf, src = make_hf_model(tmp_path, moe=False)
    model = ernie_jax.load_pretrained(src, dtype="float32")
    out = model(jnp.ones((1, 4), jnp.int32))
    assert out.logits.shape == (1, 4, 97)
    assert set(out.router_losses) == {"aux_loss", "z_loss", "orth_loss"}


def test_mtp_weights_round_trip_through_hf_layout(tmp_path):
    """transformers drops MTP weights, so check our own export/import of the -PT mtp_* keys."""
    from flax import nnx
    from ernie_jax.config import load_config
    from ernie_jax.convert.safetensors_io import SafetensorsFile
    from ernie_jax.model import build_model

    cfg = load_config(
        "configs/tiny_moe.yaml", ["model.mtp_depth=1", "model.num_layers=2", "moe.dispatch=dropless"]
    )
    model = build_model(cfg, nnx.Rngs(3))
    out = str(tmp_path / "hf")
    ernie_jax.save_pretrained(model, out)
    keys = set(SafetensorsFile(os.path.join(out, "model.safetensors")).keys())
    assert {
        "model.mtp_emb_norm.0.weight",
        "model.mtp_linear_proj.0.weight",
        "model.mtp_block.0.self_attn.q_proj.weight",
    } <= keys
    back = load_pretrained(out)
    ids = jnp.ones((1, 6), jnp.int32)
    np.testing.assert_array_equal(back(ids).mtp_logits, model(ids).mtp_logits)


def test_export_reads_each_param_once(tmp_path, monkeypatch):
    """ernie-to-hf streams: every stacked param is restored alone, once, never the whole tree."""
    from ernie_jax.convert import convert

    _, src = make_hf_model(tmp_path, shared=1, layers=3)
    ours = str(tmp_path / "ours")
    hf_to_ernie(src, ours, quiet=True)
    calls = []
    real = convert.restore_param
    monkeypatch.setattr(convert, "restore_param", lambda p, path: calls.append(path) or real(p, path))
    monkeypatch.setattr(convert, "restore_params", lambda *a, **k: pytest.fail("whole-tree restore"))
    convert.ernie_to_hf(ours, str(tmp_path / "back"), quiet=True)
    assert len(calls) == len(set(calls)) == len({e.path for e in key_table(read_our_config(ours))})
