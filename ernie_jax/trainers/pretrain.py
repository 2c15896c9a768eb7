"""Pretraining tasks: packed text (data.kind=text) or image-text (data.kind=multimodal) batches with
the LM objective (`lm.py`)."""

from __future__ import annotations

import jax

from ernie_jax.config import Config
from ernie_jax.data.multimodal import load_multimodal
from ernie_jax.data.text import load_corpus, packed_batches
from ernie_jax.trainers.lm import lm_objective, multimodal_lm_task
from ernie_jax.trainers.task import Task


def text_pretraining_task(cfg: Config):
    """Packed text batches from data.source with the LM objective; each process keeps its rows."""
    data = load_corpus(cfg.data, cfg.train.seed)
    kw = dict(
        seq_len=cfg.data.seq_len,
        batch_size=cfg.data.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_iter = iter(packed_batches(data.train, data.tokenizer, seed=cfg.data.shuffle_seed, **kw))
    eval_batches = None
    if len(data.eval):
        eval_batches = lambda: iter(packed_batches(data.eval, data.tokenizer, seed=1, **kw))
    return Task(
        objective=lm_objective,
        train_iter=train_iter,
        eval_batches=eval_batches,
        vocab_size=data.tokenizer.vocab_size,
        description=f"data: {data.stats.summary()}, {len(data.train)} train / {len(data.eval)} eval pieces",
        tokenizer=data.tokenizer,
    )


def multimodal_pretraining_task(cfg: Config):
    """Packed image-text batches (data.kind=multimodal)."""
    return multimodal_lm_task(cfg, load_multimodal(cfg))
