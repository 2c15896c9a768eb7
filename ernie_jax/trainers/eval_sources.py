"""data.eval_source: named held-out files scored at every eval, one pass each (up to
train.eval_steps batches), as eval/<name>/loss, ppl, bpb. Text files are packed as pretraining packs
them; chat JSONL is rendered as SFT renders it and scored on the assistant tokens."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax

from ernie_jax.config import Config
from ernie_jax.data.chat import is_chat_file
from ernie_jax.data.multimodal import load_multimodal, packed_multimodal_batches
from ernie_jax.data.text import load_corpus, packed_batches, resolve_paths
from ernie_jax.errors import DataError
from ernie_jax.trainers.sft import ChatEncoder, read_conversations
from ernie_jax.trainers.task import Task


def with_eval_sources(cfg: Config, task: Task) -> Task:
    """`task` with a batch factory per data.eval_source entry, each checked now (before any step)."""
    if not cfg.data.eval_source:
        return task
    sources = {name: source_batches(cfg, name, path) for name, path in cfg.data.eval_sources()}
    return dataclasses.replace(task, eval_sources=sources)


def source_batches(cfg: Config, name: str, path: str) -> Callable[[], Iterator]:
    """Batch factory of one held-out file: a single pass, the last batch filled with empty rows."""
    where = f"data.eval_source {name}={path}"
    try:
        files = resolve_paths(path)
    except DataError:
        files = []
    if not files:
        raise DataError(f"{where}: no such file; give text (.txt / .jsonl) or chat (.jsonl) files")
    sub = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=path, eval_fraction=0.0))
    procs = dict(process_index=jax.process_index(), process_count=jax.process_count())
    try:
        if all(is_chat_file(f) for f in files):
            data = load_multimodal(sub, reader=read_conversations)
            d, v = cfg.data, cfg.vision
            per_row = d.max_patches // d.batch_size if v.enabled else v.spatial_merge**2
            encoder = ChatEncoder(sub, data.tokenizer, data.stats, per_row)
            batches = packed_multimodal_batches(
                data.train,
                data.tokenizer,
                sub,
                data.stats,
                seed=1,
                repeat=False,
                split="held-out",
                encoder=encoder,
                drop_remainder=False,
                **procs,
            )
        else:
            data = load_corpus(sub.data, cfg.train.seed)
            batches = packed_batches(
                data.train,
                data.tokenizer,
                seq_len=cfg.data.seq_len,
                batch_size=cfg.data.batch_size,
                seed=1,
                repeat=False,
                drop_remainder=False,
                **procs,
            )
        first = next(iter(batches), None)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if first is None or not first["loss_mask"].any():
        raise DataError(
            f"{where} has nothing to score (no document or reply with target tokens); fix or remove it"
        )
    return lambda: iter(batches)
