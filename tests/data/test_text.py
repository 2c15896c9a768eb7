import dataclasses
import gzip
import json

import numpy as np
import pytest

from ernie_jax.config import load_config
from ernie_jax.data.text import load_corpus, packed_batches, read_documents, split_pieces
from ernie_jax.errors import DataError


def _data_cfg(**kw):
    return dataclasses.replace(load_config("configs/tiny_moe.yaml").data, **kw)


def test_bad_records_are_skipped_and_counted(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(
        b"first document here\n\nsecond one\n\n   \n\n\xff\xfe broken \xc3\n\n" + b"x" * 500 + b"\n"
    )
    jl = tmp_path / "b.jsonl.gz"
    with gzip.open(jl, "wt") as f:
        f.write(
            json.dumps({"text": "json doc"})
            + "\n{not json\n"
            + json.dumps({"other": 1})
            + "\n"
            + json.dumps({"text": ""})
            + "\n"
        )
    docs, stats = read_documents(f"{txt},{jl}", max_doc_chars=100)
    assert docs == ["first document here", "second one", "json doc"]
    assert (stats.skipped_undecodable, stats.skipped_too_long, stats.skipped_empty) == (3, 1, 2)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        load_corpus(_data_cfg(source=str(tmp_path / "nope*.txt")), 0)
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no usable document"):
        load_corpus(_data_cfg(source=str(tmp_path / "e.txt")), 0)


def test_split_pieces_keeps_all_text():
    text = " ".join(f"w{i}" for i in range(1000))
    pieces = split_pieces(text, 100)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 100


def test_packing_never_crosses_documents_and_resumes_exactly():
    data = load_corpus(_data_cfg(seq_len=64), 0)
    ds = packed_batches(data.train, data.tokenizer, seq_len=64, batch_size=4, seed=3)
    it = iter(ds)
    for _ in range(3):
        b = next(it)
        seg, mask = b["segment_ids"], b["loss_mask"]
        # a label counts only if it continues the same document
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
        np.testing.assert_array_equal(mask[:, :-1], same)
        assert np.all(mask <= (seg > 0))
        # positions restart at each document
        starts = np.diff(seg, axis=1, prepend=0) != 0
        assert np.all(b["positions"][starts & (seg > 0)] == 0)
        np.testing.assert_array_equal(
            b["labels"][:, :-1][mask[:, :-1] > 0], b["input_ids"][:, 1:][mask[:, :-1] > 0]
        )
    state = it.get_state()
    want = next(it)
    it2 = iter(ds)
    it2.set_state(json.loads(json.dumps(state)))
    got = next(it2)
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])


def test_process_slices_tile_the_global_batch():
    data = load_corpus(_data_cfg(seq_len=64), 0)
    kw = dict(seq_len=64, batch_size=4, seed=5)
    whole = next(iter(packed_batches(data.train, data.tokenizer, **kw)))
    parts = [
        next(iter(packed_batches(data.train, data.tokenizer, process_index=i, process_count=2, **kw)))
        for i in range(2)
    ]
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
    with pytest.raises(DataError, match="divisible by the 3 processes"):
        packed_batches(data.train, data.tokenizer, process_count=3, **kw)


def test_array_record_source(tmp_path):
    ar = pytest.importorskip("array_record.python.array_record_module")
    path = str(tmp_path / "c.array_record")
    w = ar.ArrayRecordWriter(path, "group_size:1")
    for i in range(20):
        w.write(json.dumps({"text": f"record number {i} says hello"}).encode())
    w.write(b"\xff\xff")
    w.close()
    data = load_corpus(_data_cfg(source=path, seq_len=32, eval_fraction=0.0), 0)
    assert len(data.train) == 21
    b = next(iter(packed_batches(data.train, data.tokenizer, seq_len=32, batch_size=2, seed=0)))
    assert "record number" in data.tokenizer.decode(b["input_ids"][0][b["segment_ids"][0] > 0])


def test_damaged_gzip_is_one_line(tmp_path):
    fake = tmp_path / "fake.txt.gz"
    fake.write_bytes(b"plain text\n\nnamed .gz")
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(gzip.compress(np.random.default_rng(0).bytes(20000).hex().encode())[:3000])
    for path in (fake, cut):
        with pytest.raises(DataError, match="is not a complete gzip file") as e:
            read_documents(str(path), max_doc_chars=10_000)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_eval_split_may_not_take_every_sample(tmp_path):
    (tmp_path / "one.txt").write_text("a single short document")
    with pytest.raises(DataError, match="leaving none to train on"):
        load_corpus(_data_cfg(source=str(tmp_path / "one.txt"), eval_fraction=0.999), 0)
