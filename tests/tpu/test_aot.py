"""Ahead-of-time compile for a TPU topology on a CPU-only machine (`python -m ernie_jax.aot`).

The compile itself needs libtpu, which the test extra does not install (684 MB): run these with
a venv made by `pip install -e '.[tpu,test]'`. Without libtpu the CLI must still fail in one line."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU,
    reason="libtpu is not installed: pip install -e '.[tpu,test]' "
    "in a separate venv and run pytest tests/tpu there",
)


def _aot(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return subprocess.run(
        [sys.executable, "-m", "ernie_jax.aot", *args], capture_output=True, text=True, timeout=900, env=env
    )


@needs_libtpu
def test_tiny_moe_compiles_with_splash_for_v5e():
    r = _aot("--config", "configs/tiny_moe.yaml", "--topology", "v5e:2x2", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["chips"] == 4 and report["attention"] == "splash" and report["fits"]
    assert 0 < report["per_chip_gb"] < report["hbm_gb"] and report["compiled_tflops_per_chip"] > 0


@needs_libtpu
def test_dropless_moe_compiles_data_parallel():
    """Per-device dropless dispatch is one unbatched ragged dot per device (a vmapped, batched one
    is refused by the TPU compiler)."""
    r = _aot(
        "--config",
        "configs/tiny_moe.yaml",
        "--topology",
        "v5e:2x2",
        "--json",
        "--set",
        "moe.dispatch=dropless",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["mesh"] == "data=4"


@needs_libtpu
def test_context_parallel_splash_compiles():
    r = _aot(
        "--config",
        "configs/tiny_moe.yaml",
        "--topology",
        "v5e:2x2",
        "--json",
        "--set",
        "mesh.context=2",
        "--set",
        "mesh.data=2",
        "--set",
        "data.seq_len=1024",
        "--set",
        "data.batch_size=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "context=2" in json.loads(r.stdout.strip().splitlines()[-1])["mesh"]


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the message shown where libtpu is missing")
def test_without_libtpu_one_line():
    r = _aot("--config", "configs/tiny_moe.yaml", "--topology", "v5e:2x2")
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "libtpu" in errors[0] and "Traceback" not in r.stderr


@needs_libtpu
def test_two_slices_compile_with_a_hybrid_mesh():
    """2 x v5e:2x2: data parallel across the slices, expert parallelism inside each; the slices are
    the devices' `slice_index`, and a dcn split that does not match them is one line."""
    common = ["--config", "configs/tiny_moe.yaml", "--topology", "v5e:2x2", "--num_slices", "2", "--json"]
    r = _aot(*common, "--set", "mesh.expert=4", "--set", "mesh.dcn.data=2")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["chips"] == 8 and report["mesh"] == "data=2 x expert=4 (dcn data=2)" and report["fits"]
    assert report["topology"] == "2 x v5e:2x2"
    r = _aot(*common, "--set", "mesh.dcn.data=4")
    assert r.returncode == 2 and "spans 4 slices but the job has 2 slices" in r.stderr
