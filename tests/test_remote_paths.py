"""gs:// workdirs, data sources and export destinations go through etils.epath and stay URLs.

gs:// is served here by an in-memory fsspec filesystem (no network, no credentials): what our code
writes there never appears on the local disk, and what it reads comes from there. Orbax writes its
arrays through tensorstore's own GCS driver, which this stand-in does not cover; conversion
exports are written locally first and uploaded, so they are covered end to end."""

import importlib
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from etils.epath import backend
from fsspec.implementations.memory import MemoryFileSystem

from ernie_jax.checkpoint.lock import WorkdirLock
from ernie_jax.config import LogConfig
from ernie_jax.convert import ernie_to_hf, hf_to_ernie, load_pretrained
from ernie_jax.data.chat import EMBEDDED_CHAT
from ernie_jax.data.text import _text_records, resolve_paths
from ernie_jax.data.tokenizer import EMBEDDED_DIR, Tokenizer
from ernie_jax.errors import CheckpointError
from ernie_jax.metrics import MetricsWriter
from ernie_jax.paths import as_path, files_under, join, shown
from ernie_jax.trainers.sft import read_conversations
from ernie_jax.trainers.stages import _read_summary
from ernie_jax.trainers.startup import check_workdir
from tests.hf_reference import make_hf_model


class _GcsInMemory(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.rstrip("/")


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    registry = importlib.import_module("fsspec.registry")._registry  # `fsspec.registry` is a read-only view
    monkeypatch.setitem(registry, "gcs", _GcsInMemory)
    monkeypatch.setenv("EPATH_USE_TF", "false")
    backend.fsspec_backend._get_filesystem.cache_clear()
    _GcsInMemory.store.clear()
    _GcsInMemory.pseudo_dirs[:] = [""]
    monkeypatch.chdir(tmp_path)  # a gs:// path turned local would appear here as ./gs:/...
    yield _GcsInMemory.store
    backend.fsspec_backend._get_filesystem.cache_clear()
    assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was written to the local disk"


def test_workdir_metrics_and_summary_on_gs(gcs):
    run = "gs://bucket/runs/exp1"
    assert shown(run) == run and join(run, "checkpoints") == "gs://bucket/runs/exp1/checkpoints"
    check_workdir(run)
    with WorkdirLock(run):  # no flock on an object store: not taken, nothing written
        pass
    w = MetricsWriter(run, LogConfig(tensorboard=False))
    for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
    w.close()
    text = as_path(join(run, "metrics.jsonl")).read_text()
    assert [json.loads(line)["step"] for line in text.splitlines()] == [1, 2, 3]
    # a resume from step 2 moves row 3 aside (an object store has no append: the file is rewritten)
    MetricsWriter(run, LogConfig(tensorboard=False), resume_step=2).close()
    assert [json.loads(r)["step"] for r in as_path(join(run, "metrics.jsonl")).read_text().splitlines()] == [
        1,
        2,
    ]
    assert json.loads(as_path(join(run, "metrics.superseded.jsonl")).read_text())["step"] == 3
    as_path(join(run, "stages.json")).write_text(json.dumps([{"stage": "text"}]))
    assert _read_summary(join(run, "stages.json")) == [{"stage": "text"}]
    assert any(k.startswith("bucket/runs/exp1/metrics.jsonl") for k in gcs)


def test_data_and_tokenizer_read_from_gs(gcs):
    corpus = as_path("gs://bucket/corpus")
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "a.jsonl").write_text(json.dumps({"text": "in the beginning"}) + "\n")
    (corpus / "b.jsonl").write_text(json.dumps({"text": "and the earth"}) + "\n")
    paths = resolve_paths("gs://bucket/corpus/*.jsonl")
    assert paths == ["gs://bucket/corpus/a.jsonl", "gs://bucket/corpus/b.jsonl"]
    assert [r.decode() for p in paths for r in _text_records(p)] == ["in the beginning", "and the earth"]
    tok_dir = as_path("gs://bucket/tokenizer")
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "tokenizer.model").write_bytes(
        open(os.path.join(EMBEDDED_DIR, "tokenizer.model"), "rb").read()
    )
    remote, local = Tokenizer("gs://bucket/tokenizer"), Tokenizer("embedded")
    assert remote.encode("let there be light") == local.encode("let there be light")
    as_path("gs://bucket/chat/sft.jsonl").write_bytes(open(EMBEDDED_CHAT, "rb").read())
    assert len(read_conversations("gs://bucket/chat/sft.jsonl")[0]) == len(read_conversations("embedded")[0])


def test_export_to_gs_uploads_the_finished_directory(gcs, tmp_path):
    _, src = make_hf_model(tmp_path, layers=2)
    hf_to_ernie(src, "gs://bucket/ours", quiet=True)
    hf_to_ernie(src, str(tmp_path / "ours"), quiet=True)
    # the uploaded orbax params (file names inside differ run to run) load to the same model
    down = tmp_path / "down"
    for rel in files_under("gs://bucket/ours"):
        os.makedirs(os.path.dirname(down / rel), exist_ok=True)
        (down / rel).write_bytes(as_path(join("gs://bucket/ours", rel)).read_bytes())
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    np.testing.assert_array_equal(
        load_pretrained(str(down))(ids).logits, load_pretrained(str(tmp_path / "ours"))(ids).logits
    )
    ernie_to_hf(str(tmp_path / "ours"), "gs://bucket/hf", quiet=True)
    ernie_to_hf(str(tmp_path / "ours"), str(tmp_path / "exported"), quiet=True)
    for rel in files_under(str(tmp_path / "exported")):
        assert (
            as_path(join("gs://bucket/hf", rel)).read_bytes()
            == open(tmp_path / "exported" / rel, "rb").read()
        ), rel
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p or p.startswith(".ernie-convert-")]
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        ernie_to_hf(str(tmp_path / "ours"), "gs://bucket/hf", quiet=True)
    with pytest.raises(CheckpointError, match="read memory-mapped from local disk; copy it first"):
        hf_to_ernie("gs://bucket/hf", str(tmp_path / "again"), quiet=True)
