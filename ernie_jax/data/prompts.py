"""Prompts for on-policy RL (`data.kind: prompts`): JSONL `{"prompt": str | "messages": [...],
"answer": ..., "reward": {...}}`, rendered in the ERNIE chat format up to `Assistant: ` (plain,
thinking or no_thinking, as in SFT) and tokenized once. Lines that are not JSON, use unknown roles,
carry images (text models) or leave no room for `rl.max_new_tokens` in `data.seq_len` are skipped
and counted; a verifier that needs answers refuses prompts without one in one line.
"""

from __future__ import annotations

import dataclasses
import os

from ernie_jax.data.chat import ChatError, prompt_ids
from ernie_jax.data.multimodal import MultimodalStats, read_jsonl
from ernie_jax.data.tokenizer import EMBEDDED_DIR
from ernie_jax.errors import DataError

EMBEDDED_PROMPTS = os.path.join(EMBEDDED_DIR, "rl", "prompts.jsonl")
EMBEDDED_PROMPTS_EVAL = os.path.join(EMBEDDED_DIR, "rl", "eval.jsonl")
EMBEDDED_WARMUP = os.path.join(EMBEDDED_DIR, "rl", "sft.jsonl")


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # the rendered prompt up to `Assistant: `
    text: str  # the last user message (what a reward function sees as the prompt)
    sample: dict  # the JSONL object: "answer", "reward" and anything a reward function reads


def _messages(obj: dict) -> list:
    messages = obj.get("messages") or [{"role": "user", "content": obj["prompt"]}]
    if not isinstance(messages, list) or not messages:
        raise ValueError
    return messages


def read_prompts(
    source: str, tokenizer, mode: str, max_len: int, embedded: str = EMBEDDED_PROMPTS
) -> tuple[list[Prompt], MultimodalStats]:
    """Usable prompts of `source` ('embedded': the arithmetic task) at most `max_len` tokens long."""
    raw, stats = read_jsonl(source, embedded, lambda base, obj: (obj, _messages(obj)))
    out = []
    for obj, messages in raw:
        if obj.get("images") or obj.get("video"):
            stats.add("vision_in_text_model")
            continue
        try:
            ids = prompt_ids(tokenizer, messages, mode)
        except ChatError as e:
            stats.add(str(e))
            continue
        if len(ids) > max_len:
            stats.add("too_long")
            continue
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        out.append(Prompt(tuple(ids), str(users[-1] if users else ""), obj))
    if not out:
        raise DataError(f"data.source={source} holds no usable prompt ({stats.summary()})")
    stats.samples = len(out)
    return out, stats


def require_answers(prompts: list[Prompt], source: str, reward: str) -> None:
    """Verifiers compare with an answer: every prompt needs one (unless it names its own check)."""
    missing = [
        i
        for i, p in enumerate(prompts)
        if p.sample.get("answer") is None and (p.sample.get("reward") or {}).get("type") != "regex"
    ]
    if missing:
        raise DataError(
            f"data.source={source}: {len(missing)} prompts (e.g. the {missing[0] + 1}th usable one) have no "
            f'"answer", which rl.reward={reward} compares with; add answers or use rl.reward=regex or a '
            f"reward function"
        )
