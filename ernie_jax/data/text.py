"""Text pretraining data: documents from .txt/.jsonl(.gz)/ArrayRecord -> tokens -> packed batches (grain).

Documents are cut into pieces at whitespace (about `seq_len` tokens each) so long documents are
used whole, tokenized lazily, packed first-fit into rows of seq_len+1 tokens with segment ids and
positions (no cross-document attention), shuffled deterministically, sharded per process and
batched. The grain iterator state goes into every checkpoint, so resume continues at the next batch.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import zlib
from typing import Iterator, Sequence

import grain
import numpy as np

from ernie_jax.data.tokenizer import EMBEDDED_DIR, Tokenizer
from ernie_jax.errors import DataError
from ernie_jax.paths import as_path, is_remote

EMBEDDED_CORPUS = os.path.join(EMBEDDED_DIR, "kjv.txt.gz")
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")
PIECE_CHARS_PER_ROW = 64  # a piece spans a few rows even at 1 char/token, bounding the tokenize fan-out


@dataclasses.dataclass
class CorpusStats:
    documents: int = 0
    skipped_empty: int = 0
    skipped_undecodable: int = 0
    skipped_too_long: int = 0

    def summary(self) -> str:
        return (
            f"{self.documents} documents ({self.skipped_empty} empty, "
            f"{self.skipped_undecodable} undecodable, "
            f"{self.skipped_too_long} over-long skipped)"
        )


def resolve_paths(source: str) -> list[str]:
    """`embedded` or comma-separated files/globs -> existing file paths (one clear error otherwise)."""
    if source == "embedded":
        return [EMBEDDED_CORPUS]
    paths: list[str] = []
    for part in [p.strip() for p in source.split(",") if p.strip()]:
        matches = _glob(part) if any(c in part for c in "*?[") else [part]
        if not matches or not all(as_path(m).is_file() for m in matches):
            raise DataError(
                f"data.source: {part} matches no file; pass existing .txt/.jsonl/.array_record paths"
            )
        paths += matches
    if not paths:
        raise DataError("data.source is empty; pass 'embedded' or paths to .txt/.jsonl/.array_record files")
    return paths


def _glob(pattern: str) -> list[str]:
    """Files matching a glob, local or in an object store (gs://bucket/corpus/*.jsonl)."""
    if not is_remote(pattern):
        return sorted(glob.glob(pattern))
    root = as_path(pattern.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0])
    rest = pattern[len(os.fspath(root)) :].lstrip("/")
    return sorted(os.fspath(p) for p in root.glob(rest))


def _open_bytes(path: str) -> bytes:
    try:
        data = as_path(path).read_bytes()
        return gzip.decompress(data) if path.endswith(".gz") else data
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off stream is EOFError
        what = "is not a complete gzip file" if path.endswith(".gz") else "cannot be read"
        raise DataError(
            f"data.source: {path} {what} ({e}); re-create or re-download it, or leave it out"
        ) from None


def _text_records(path: str) -> Iterator[bytes | None]:
    """Raw document bytes from a text file (blank-line separated) or JSONL (`text` field)."""
    data = _open_bytes(path)
    if path.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        for line in data.splitlines():
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (ValueError, AttributeError):
                yield None
                continue
            yield text.encode("utf-8", "surrogatepass") if isinstance(text, str) else None
    else:
        yield from _BLANK_LINE.split(data)


def read_documents(source: str, max_doc_chars: int) -> tuple[list[str], CorpusStats]:
    """All documents of text/JSONL sources, skipping and counting bad ones."""
    stats, docs = CorpusStats(), []
    for path in resolve_paths(source):
        if path.endswith(".array_record"):
            continue
        for raw in _text_records(path):
            if raw is None:
                stats.skipped_undecodable += 1
                continue
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                stats.skipped_undecodable += 1
                continue
            if not text:
                stats.skipped_empty += 1
            elif len(text) > max_doc_chars:
                stats.skipped_too_long += 1
            else:
                docs.append(text)
    stats.documents = len(docs)
    return docs, stats


def split_pieces(text: str, max_chars: int) -> list[str]:
    """Cut a document at whitespace into pieces of at most ~max_chars characters."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.rfind(" ", start + max_chars // 2, start + max_chars)
        cut = start + max_chars if cut < 0 else cut
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class _Pieces(grain.sources.RandomAccessDataSource):
    """(document, piece) index over an in-memory corpus; each item is the text of one piece."""

    def __init__(self, docs: Sequence[str], max_chars: int):
        self._items = [p for d in docs for p in split_pieces(d, max_chars)]

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]


class _ArrayRecordText:
    """Bytes records (UTF-8 text or JSON with `text`) from ArrayRecord files; bad records -> ''."""

    def __init__(self, paths: list[str]):
        self._src = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self):
        return len(self._src)

    def __getitem__(self, i):
        raw = self._src[i]
        try:
            text = raw.decode("utf-8")
            if text.lstrip().startswith("{"):
                text = json.loads(text).get("text", "")
            return text if isinstance(text, str) else ""
        except (UnicodeDecodeError, ValueError, AttributeError):
            return ""


def _split_indices(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    is_eval = np.random.default_rng(seed + 7919).random(n) < eval_fraction
    if eval_fraction > 0 and not is_eval.any() and n > 1:
        is_eval[-1] = True
    if is_eval.all():
        raise DataError(
            f"data.eval_fraction={eval_fraction} holds out all {n} samples of the data, leaving none "
            f"to train on; lower it or add data"
        )
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


@dataclasses.dataclass
class TextData:
    """The resolved corpus: pieces for train and eval, the tokenizer and what was skipped."""

    train: grain.MapDataset
    eval: grain.MapDataset
    tokenizer: Tokenizer
    stats: CorpusStats


def load_corpus(data_cfg, seed: int) -> TextData:
    tokenizer = Tokenizer(data_cfg.tokenizer)
    docs, stats = read_documents(data_cfg.source, data_cfg.max_doc_chars)
    max_chars = data_cfg.seq_len * PIECE_CHARS_PER_ROW
    sources = []
    if docs:
        sources.append(grain.MapDataset.source(_Pieces(docs, max_chars)))
    records = [p for p in resolve_paths(data_cfg.source) if p.endswith(".array_record")]
    if records:
        sources.append(grain.MapDataset.source(_ArrayRecordText(records)))
    if not sources:
        raise DataError(f"data.source={data_cfg.source} holds no usable document ({stats.summary()})")
    ds = sources[0] if len(sources) == 1 else grain.MapDataset.concatenate(sources)
    train_idx, eval_idx = _split_indices(len(ds), data_cfg.eval_fraction, seed)
    return TextData(
        train=_select(ds, train_idx), eval=_select(ds, eval_idx), tokenizer=tokenizer, stats=stats
    )


def _select(ds: grain.MapDataset, idx: np.ndarray) -> grain.MapDataset:
    return grain.MapDataset.range(len(idx)).map(lambda i: ds[int(idx[i])])


def packed_batches(
    pieces: grain.MapDataset,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """Packed model batches: dicts of input_ids/labels/positions/segment_ids [b, seq_len] and loss_mask.
    Without `drop_remainder` (a single pass for scoring) the last batch is filled with empty rows.

    Every process builds the same global batch of `batch_size` rows and keeps its own contiguous
    slice, so the data a step sees does not depend on the number of processes (runs and resumes
    agree across host counts). The cost is that each host tokenizes the whole global batch."""
    if batch_size % process_count:
        raise DataError(f"data.batch_size={batch_size} must be divisible by the {process_count} processes")
    ds = pieces.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()

    it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(), _TokenizeChunks(tokenizer, seq_len + 1))
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={"tokens": seq_len + 1}, num_packing_bins=max(8, 2 * batch_size), seed=seed
    )
    it = it.map(_to_model_inputs).batch(batch_size, drop_remainder=drop_remainder)
    if not drop_remainder:
        it = it.map(lambda b: fill_rows(b, batch_size))
    if process_count > 1:
        rows = batch_size // process_count
        lo = process_index * rows
        it = it.map(lambda b: {k: v[lo : lo + rows] for k, v in b.items()})
    return it


def fill_rows(batch: dict, rows: int) -> dict:
    """A short last batch padded with empty rows (zeros: padding segment, no loss) to `rows`, so
    every batch has the one compiled shape."""
    return {
        k: np.concatenate([v, np.zeros((rows - len(v), *v.shape[1:]), v.dtype)]) for k, v in batch.items()
    }


class _TokenizeChunks(grain.experimental.FlatMapTransform):
    """Text piece -> [bos] + ids + [eos] cut into rows of at most `row` tokens (tiny tails dropped)."""

    def __init__(self, tokenizer: Tokenizer, row: int):
        self.tokenizer, self.row = tokenizer, row
        self.max_fan_out = PIECE_CHARS_PER_ROW + 1

    def flat_map(self, text: str):
        ids = np.asarray(
            [self.tokenizer.bos_id] + self.tokenizer.encode(text) + [self.tokenizer.eos_id], np.int32
        )
        chunks = [ids[i : i + self.row] for i in range(0, ids.size, self.row)]
        return [{"tokens": c} for c in chunks if c.size > 2]


def _to_model_inputs(ex: dict) -> dict:
    tokens, seg, pos = ex["tokens"], ex["tokens_segment_ids"], ex["tokens_positions"]
    same_doc = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    return {
        "input_ids": tokens[:-1].astype(np.int32),
        "labels": tokens[1:].astype(np.int32),
        "loss_mask": same_doc.astype(np.float32),
        "positions": pos[:-1].astype(np.int32),
        "segment_ids": seg[:-1].astype(np.int32),
    }
