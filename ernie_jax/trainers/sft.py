"""Supervised fine-tuning: chat JSONL rendered in the ERNIE 4.5 format, loss on assistant tokens only,
packed with segment ids, text or multimodal (images in user turns) through the multimodal pipeline.
The objective is the pretraining LM objective: only the loss mask differs."""

from __future__ import annotations

from ernie_jax.config import Config
from ernie_jax.data.chat import EMBEDDED_CHAT, ChatError, markers, render_chat
from ernie_jax.data.multimodal import MultimodalStats, SampleEncoder, load_multimodal, read_jsonl
from ernie_jax.trainers.lm import multimodal_lm_task
from ernie_jax.trainers.task import Task


def read_conversations(source: str):
    def parse(base, obj):
        messages = obj["messages"]
        if not isinstance(messages, list):
            raise ValueError
        return base, messages, list(obj.get("images") or [])

    return read_jsonl(source, EMBEDDED_CHAT, parse)


class ChatEncoder:
    """(base, messages, images) -> SampleEncoder features of the rendered conversation, or None."""

    def __init__(self, cfg: Config, tokenizer, stats: MultimodalStats, max_patches_row: int):
        self.mode, self.stats = cfg.data.chat_mode, stats
        self.begin, self.end = markers(tokenizer)
        self.encode = SampleEncoder(cfg, tokenizer, stats, max_patches_row)

    def __call__(self, item):
        base, messages, images = item
        try:
            segs = render_chat(messages, self.mode, self.begin, self.end, images)
        except ChatError as e:
            self.stats.add(e.reason)
            return None
        return self.encode((base, segs, False))


def sft_task(cfg: Config) -> Task:
    data = load_multimodal(cfg, reader=read_conversations)
    per_row = (
        cfg.data.max_patches // cfg.data.batch_size if cfg.vision.enabled else cfg.vision.spatial_merge**2
    )
    return multimodal_lm_task(
        cfg,
        data,
        encoder=ChatEncoder(cfg, data.tokenizer, data.stats, per_row),
        description=f"chat data: {data.stats.summary()}, {len(data.train)} train / "
        f"{len(data.eval)} eval conversations, mode {cfg.data.chat_mode}",
    )
