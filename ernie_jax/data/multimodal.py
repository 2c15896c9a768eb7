"""Image-text (and video-text) data: JSONL samples -> tokens + vision patches -> packed batches (grain).

Sample format, one JSON object per line; paths are relative to the JSONL file:

    {"content": [{"text": "..."}, {"image": "a.png"}, {"video": ["f0.png", "f1.png", ...]}, ...]}
    {"image": "a.png", "text": "caption"}               (shorthand: the image, then the text)

A sample becomes [bos] text / [start] placeholders [end] ... [eos] with token types (0 text, 1 image,
2 video), 3D positions (model/positions.py) and its patches. Samples are packed first-fit into rows
of seq_len+1 tokens and at most `data.max_patches` / batch_size patches per row, then a batch
gathers every row's patches (images first, then videos: the order the model scatters them in) and
the fixed-shape index arrays of `vision_layout`. The loss covers text targets only.

Unreadable images, odd channel layouts, images below the minimum side, missing files and samples
too long for a row are skipped, counted (`MultimodalStats`) and warned about with the path.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading

import grain
import numpy as np
from absl import logging

from ernie_jax.data.images import ImageError, load_rgb, preprocess_frames, sample_frames
from ernie_jax.data.text import _split_indices, fill_rows
from ernie_jax.data.tokenizer import EMBEDDED_DIR, Tokenizer
from ernie_jax.errors import DataError
from ernie_jax.model.positions import IMAGE, TEXT, VIDEO, sample_position_ids
from ernie_jax.model.vision import vision_layout
from ernie_jax.paths import as_path, join, shown

EMBEDDED_VL = os.path.join(EMBEDDED_DIR, "mnist", "captions.jsonl")
VISION_KEYS = ("patches", "patch_hw", "frame_ids", "pair_first", "pair_second", "row_valid")


@dataclasses.dataclass
class MultimodalStats:
    """Counts of skipped samples by reason (thread-safe; grain may map in threads)."""

    samples: int = 0
    bad_json: int = 0
    bad_image: int = 0
    missing_file: int = 0
    too_long: int = 0
    bad_role: int = 0  # chat: unknown role, or a system message after the first
    no_reply: int = 0  # chat: a conversation without an assistant reply
    empty_response: int = 0
    same_pair: int = 0  # preference: chosen == rejected
    vision_in_text_model: int = 0
    missing_at_start: int = 0  # samples naming an image file that did not exist when the data was read

    def __post_init__(self):
        self._lock = threading.Lock()
        self._warned: set = set()

    def warn_once(self, key: str, message: str) -> None:
        """One warning per bad file, not one per epoch or pipeline that meets it (counts go on)."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logging.warning("%s", message)

    def add(self, field: str) -> None:
        with self._lock:
            setattr(self, field, getattr(self, field) + 1)

    def counts(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def restore(self, counts: dict) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, v)

    def summary(self) -> str:
        """What is known when the data is read; images are decoded (and skipped) as batches are built."""
        extra = "".join(
            f", {getattr(self, k)} {k.replace('_', ' ')}"
            for k in (
                "bad_image",
                "missing_file",
                "too_long",
                "bad_role",
                "no_reply",
                "empty_response",
                "same_pair",
                "vision_in_text_model",
            )
            if getattr(self, k)
        )
        missing = f", {self.missing_at_start} naming missing image files" if self.missing_at_start else ""
        return (
            f"{self.samples} samples ({self.bad_json} bad JSON skipped{missing}{extra}; "
            f"samples with unusable "
            f"images or too long for a row are skipped when read, counted in the data_skipped_* metrics)"
        )

    def as_metrics(self) -> dict:
        return {
            f"data_skipped_{k}": getattr(self, k)
            for k in (
                "bad_json",
                "bad_image",
                "missing_file",
                "too_long",
                "bad_role",
                "no_reply",
                "empty_response",
                "same_pair",
                "vision_in_text_model",
            )
        }


def read_jsonl(source: str, embedded: str, parse) -> tuple[list, MultimodalStats]:
    """`parse(base_dir, obj)` for every line of the JSONL files in `source` ('embedded' = `embedded`);
    lines that are not JSON, or that `parse` rejects with ValueError/KeyError/TypeError, are counted."""
    paths = [embedded] if source == "embedded" else [p.strip() for p in source.split(",") if p.strip()]
    stats, out, missing = MultimodalStats(), [], []
    for path in paths:
        if not as_path(path).is_file():
            raise DataError(f"data.source: {path} is not a file; pass JSONL files (or 'embedded')")
        base = os.fspath(as_path(shown(path)).parent)  # images are named relative to their JSONL
        with as_path(path).open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    out.append(parse(base, obj))
                except (ValueError, KeyError, TypeError, AttributeError):
                    stats.bad_json += 1
                    continue
                gone = [f for f in _named_files(obj) if not as_path(join(base, f)).is_file()]
                if gone:  # kept (sample indices stay stable), skipped and counted when encoded
                    stats.missing_at_start += 1
                    missing.append(join(base, gone[0]))
    if missing:
        logging.warning(
            "%d samples name image files that do not exist (e.g. %s); they are skipped",
            len(missing),
            ", ".join(missing[:3]),
        )
    if not out:
        raise DataError(f"data.source={source} holds no usable sample ({stats.summary()})")
    stats.samples = len(out)
    return out, stats


def _named_files(obj) -> list[str]:
    """Image paths a raw JSONL sample names: "image" strings, "images" / "video" lists, at any depth."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "image" and isinstance(v, str):
                out.append(v)
            elif k in ("images", "video") and isinstance(v, list):
                out += [x for x in v if isinstance(x, str)]
            else:
                out += _named_files(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _named_files(v)
    return out


def read_samples(source: str) -> tuple[list[tuple[str, dict]], MultimodalStats]:
    """(base dir, content) for every line of the image-text JSONL files in `source`."""

    def parse(base, obj):
        content = obj["content"] if "content" in obj else [{"image": obj["image"]}, {"text": obj["text"]}]
        if not isinstance(content, list) or not content:
            raise ValueError
        return base, content

    return read_jsonl(source, EMBEDDED_VL, parse)


def vision_token_ids(v, kind: int, grid: tuple[int, int, int]) -> list[int]:
    """An image's (kind IMAGE) or video's (VIDEO) tokens for its patch grid (t, h, w): the start
    marker, one placeholder per merged patch (2x2 spatially, pairs of frames for a video), the end
    marker; `v` is the VisionConfig."""
    t, gh, gw = grid
    n = (t // v.temporal_merge if kind == VIDEO else 1) * (gh // v.spatial_merge) * (gw // v.spatial_merge)
    if kind == IMAGE:
        return [v.image_start_token_id] + [v.image_token_id] * n + [v.image_end_token_id]
    return [v.video_start_token_id] + [v.video_token_id] * n + [v.video_end_token_id]


class SampleEncoder:
    """(base dir, content[, wrap]) -> packable features, or None (skipped and counted).

    Content segments: {"text": str, "train": bool}, {"ids": [int], "train": bool}, {"image": path},
    {"video": [paths]}. `train` (default true) marks tokens the loss predicts; vision tokens never
    are. `wrap` (default true) adds bos/eos around the sample (chat renders its own markers)."""

    def __init__(self, cfg, tokenizer: Tokenizer, stats: MultimodalStats, max_patches_row: int):
        self.cfg, self.tok, self.stats, self.max_patches_row = cfg, tokenizer, stats, max_patches_row
        v, d = cfg.vision, cfg.data
        self.merge, self.patch = v.spatial_merge, v.patch_size
        self.resize = dict(
            patch=v.patch_size,
            merge=v.spatial_merge,
            min_pixels=d.image_min_pixels,
            max_pixels=d.image_max_pixels,
        )

    def __call__(self, item):
        base, content, *rest = item
        wrap = rest[0] if rest else True
        v = self.cfg.vision
        tokens, types, targets, patches, items, grids = [], [], [], [], [], []
        if wrap:
            tokens, types, targets = [self.tok.bos_id], [TEXT], [0]
        for seg in content:
            if not isinstance(seg, dict):
                self.stats.add("bad_json")
                return None
            if "text" in seg or "ids" in seg:
                ids = self.tok.encode(str(seg["text"])) if "text" in seg else [int(i) for i in seg["ids"]]
                tokens += ids
                types += [TEXT] * len(ids)
                targets += [int(seg.get("train", True))] * len(ids)
                continue
            kind = IMAGE if "image" in seg else VIDEO if "video" in seg else None
            if kind is None:
                self.stats.add("bad_json")
                return None
            if not v.enabled:
                self.stats.add("vision_in_text_model")
                return None
            files = (
                [seg["image"]]
                if kind == IMAGE
                else list(seg["video"] if isinstance(seg["video"], list) else [])
            )
            if not files:
                self.stats.add("bad_json")
                return None
            if kind == VIDEO:
                files = [files[i] for i in sample_frames(len(files), self.cfg.data.max_frames)]
            frames = []
            for name in files:
                path = join(base, str(name))
                if not as_path(path).is_file():
                    self.stats.add("missing_file")  # warned about once, when the data was read
                    return None
                try:
                    frames.append(load_rgb(path, min_side=self.cfg.data.image_min_side))
                except ImageError as e:
                    self.stats.warn_once(path, f"skipping samples with image {path}: it is unusable: {e}")
                    self.stats.add("bad_image")
                    return None
            try:
                pix, (t, gh, gw) = preprocess_frames(frames, **self.resize)
            except ImageError as e:
                self.stats.warn_once(files[0], f"skipping samples with image {files[0]}: it is unusable: {e}")
                self.stats.add("bad_image")
                return None
            ids = vision_token_ids(v, kind, (t, gh, gw))
            n = len(ids) - 2
            tokens += ids
            types += [TEXT] + [kind] * n + [TEXT]
            targets += [0] * (n + 1) + [1]  # the end marker is predictable text; placeholders are not
            patches.append(pix)
            items.append((kind, t, gh, gw))
            grids.append((t, gh, gw))
        if wrap:
            tokens.append(self.tok.eos_id)
            types.append(TEXT)
            targets.append(1)
        npatch = sum(len(p) for p in patches)
        if (
            len(tokens) > self.cfg.data.seq_len + 1
            or npatch > self.max_patches_row
            or len(items) > self.cfg.data.max_images_per_row
        ):
            self.stats.add("too_long")
            return None
        pos = sample_position_ids(np.array(types), iter(grids), self.merge, self.cfg.vision.temporal_merge)
        dim = 3 * self.patch * self.patch
        return {
            "tokens": np.asarray(tokens, np.int32),
            "types": np.asarray(types, np.int32),
            "targets": np.asarray(targets, np.int32),
            "pos3": pos.astype(np.int32),
            "patches": np.concatenate(patches).astype(np.float32)
            if patches
            else np.zeros((0, dim), np.float32),
            "items": np.asarray(items, np.int32).reshape(-1, 4),
        }


def _row_inputs(ex: dict) -> dict:
    """Packed row -> model inputs for the text side (vision is gathered per batch)."""
    tokens, seg, types = ex["tokens"], ex["tokens_segment_ids"], ex["types"]
    same = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    target = (types[1:] == TEXT) & (ex["targets"][1:] > 0)
    return {
        "input_ids": tokens[:-1],
        "labels": tokens[1:],
        "loss_mask": (same & target).astype(np.float32),
        "positions": ex["pos3"][:-1],
        "segment_ids": seg[:-1],
        "_patches": ex["patches"],
        "_items": ex["items"],
        "_items_seg": ex["items_segment_ids"],
    }


def vision_arrays(rows, merge: int, num_patches: int, dim: int) -> dict:
    """[(patches [n, D], items [k, 4] of (kind, t, h, w))] per row -> the batch's patches
    [num_patches, D] (images first, then videos, each in row order: the order the model scatters them
    in), zero-padded, and the fixed-shape `vision_layout` arrays."""
    chunks = {IMAGE: [], VIDEO: []}
    for row_patches, items in rows:
        offset = 0
        for kind, t, h, w in np.asarray(items).reshape(-1, 4).tolist():
            n = t * h * w
            chunks[int(kind)].append((row_patches[offset : offset + n], (t, h, w)))
            offset += n
    ordered = chunks[IMAGE] + chunks[VIDEO]
    patches = np.zeros((num_patches, dim), np.float32)
    if ordered:
        flat = np.concatenate([p for p, _ in ordered])
        if len(flat) > num_patches:
            raise DataError(f"{len(flat)} patches exceed data.max_patches={num_patches}; raise it")
        patches[: len(flat)] = flat
    grids = np.array([g for _, g in ordered], np.int64).reshape(-1, 3)
    layout = vision_layout(grids, merge, num_patches=num_patches, num_rows=num_patches // (merge * merge))
    return {"patches": patches, **layout}


class CollateVision:
    """Batch of packed rows -> `vision_arrays` of their items (those with a segment id)."""

    def __init__(self, merge: int, num_patches: int):
        self.merge, self.num_patches = merge, num_patches

    def __call__(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if not k.startswith("_")}
        rows = [
            (batch["_patches"][b], batch["_items"][b][batch["_items_seg"][b] != 0])
            for b in range(batch["_items"].shape[0])
        ]
        return {**out, **vision_arrays(rows, self.merge, self.num_patches, batch["_patches"].shape[-1])}


@dataclasses.dataclass
class MultimodalData:
    train: grain.MapDataset
    eval: grain.MapDataset
    tokenizer: Tokenizer
    stats: MultimodalStats


def load_multimodal(cfg, reader=None) -> MultimodalData:
    """Samples of data.source split into train / eval; `reader(source)` parses the JSONL (image-text
    samples by default; chat and preference readers for SFT and DPO)."""
    tokenizer = Tokenizer(cfg.data.tokenizer)
    samples, stats = (reader or read_samples)(cfg.data.source)
    ds = grain.MapDataset.source(samples)
    train_idx, eval_idx = _split_indices(len(ds), cfg.data.eval_fraction, cfg.train.seed)
    pick = lambda idx: grain.MapDataset.range(len(idx)).map(lambda i: ds[int(idx[i])])
    return MultimodalData(pick(train_idx), pick(eval_idx), tokenizer, stats)


def packed_multimodal_batches(
    samples: grain.MapDataset,
    tokenizer: Tokenizer,
    cfg,
    stats: MultimodalStats,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    encoder=None,
    row_inputs=None,
    extra_lengths: dict | None = None,
    split: str = "train",
    drop_remainder: bool = True,
) -> grain.IterDataset:
    """Packed batches with input_ids/labels/loss_mask/segment_ids [b, S], positions [b, S, 3] and the
    vision arrays (VISION_KEYS). Each process keeps its contiguous rows and builds their vision arrays.
    Without `drop_remainder` (a single scoring pass) the last batch is filled with empty rows."""
    d = cfg.data
    row_inputs = row_inputs or _row_inputs
    extra_lengths = extra_lengths or {}
    if d.batch_size % process_count:
        raise DataError(f"data.batch_size={d.batch_size} must be divisible by the {process_count} processes")
    merge2 = cfg.vision.spatial_merge**2
    per_row = d.max_patches // d.batch_size
    if cfg.vision.enabled and (per_row < merge2 or d.max_patches % (d.batch_size * merge2)):
        raise DataError(
            f"data.max_patches={d.max_patches} must be a multiple of data.batch_size x "
            f"{merge2} (the 2x2 merge); raise it"
        )
    if not cfg.vision.enabled:
        per_row = merge2  # text-only model: no sample has patches; a minimal slot keeps the packer happy
    encoder = encoder or SampleEncoder(cfg, tokenizer, stats, per_row)
    _require_usable(samples, encoder, stats, d.source, split)
    ds = samples.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    it = ds.map(encoder).filter(lambda x: x is not None).to_iter_dataset()
    length = {
        "tokens": d.seq_len + 1,
        "types": d.seq_len + 1,
        "targets": d.seq_len + 1,
        "pos3": d.seq_len + 1,
        "patches": per_row,
        "items": d.max_images_per_row,
        **extra_lengths,
    }
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct=length, num_packing_bins=max(8, 2 * d.batch_size), seed=seed
    )
    it = it.map(row_inputs).batch(d.batch_size, drop_remainder=drop_remainder)
    if not drop_remainder:
        it = it.map(lambda b: fill_rows(b, d.batch_size))
    rows = d.batch_size // process_count
    lo = process_index * rows
    if process_count > 1:
        it = it.map(lambda b: {k: v[lo : lo + rows] for k, v in b.items()})
    if not cfg.vision.enabled:
        return it.map(_text_only)
    return it.map(CollateVision(cfg.vision.spatial_merge, per_row * rows))


def _require_usable(
    samples, encoder, stats: MultimodalStats, source: str, split: str = "train", probe: int = 64
) -> None:
    """A source whose samples all get skipped would spin forever in a repeating pipeline: encode the
    first few up front and stop with one line when none is usable (the counts stay untouched)."""
    if not len(samples):
        return
    before = stats.counts()
    ok = sum(encoder(samples[i]) is not None for i in range(min(probe, len(samples))))
    after = stats.counts()
    stats.restore(before)
    if not ok:
        reasons = ", ".join(
            f"{v - before[k]} {k.replace('_', ' ')}" for k, v in after.items() if v > before[k]
        )
        which = "" if split == "train" else f" {split}"
        fix = {"train": "", "eval": " or set data.eval_fraction=0 (no eval)"}.get(split, "")
        raise DataError(
            f"data.source={source}: none of the first {min(probe, len(samples))}{which} samples is "
            f"usable ({reasons}); fix the data or raise data.seq_len / data.max_patches{fix}"
        )


def check_eval_batches(batches: grain.IterDataset, samples: int, cfg, stats: MultimodalStats) -> None:
    """At start-up, not at the first eval: the eval split must fill one batch with target tokens
    (the skip counts stay those of the training stream)."""
    before = stats.counts()
    first = next(iter(batches), None)
    stats.restore(before)
    fix = "raise data.eval_fraction or set it to 0 (no eval)"
    if first is None:
        raise DataError(
            f"data.eval_fraction={cfg.data.eval_fraction}: the {samples} eval samples fill no batch of "
            f"data.batch_size={cfg.data.batch_size} rows; {fix}"
        )
    if not np.any(first["loss_mask"]):
        raise DataError(
            f"data.source={cfg.data.source}: the first eval batch has no target tokens (nothing the "
            f"loss scores, e.g. no assistant reply); fix the eval data or {fix}"
        )


def _text_only(batch: dict) -> dict:
    """Text-only model: 1D positions, no vision arrays."""
    out = {k: v for k, v in batch.items() if not k.startswith("_")}
    out["positions"] = out["positions"][..., 0]
    return out
