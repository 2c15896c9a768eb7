"""Prompts for on-policy RL (`data.kind: prompts`): JSONL `{"prompt": str | "messages": [...],
"images": [...], "answer": ..., "reward": {...}}`, rendered in the ERNIE chat format up to
`Assistant: ` (plain, thinking or no_thinking, as in SFT) and encoded once. Image paths are relative to
the JSONL file; "images" go in front of the first user message, and message content may also be a list
of {"text"} / {"image": path} / {"video": [paths]} segments. A VL model's prompts are encoded by the
multimodal pipeline's encoder (placeholders, 3D positions, patches); a text model skips and counts
prompts with images. Lines that are not JSON, use unknown roles, have unusable images or leave no room
for `rl.max_new_tokens` in `data.seq_len` are skipped and counted; a verifier that needs answers
refuses prompts without one in one line.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ernie_jax.data.chat import ChatError, markers, prompt_ids, render_prompt
from ernie_jax.data.multimodal import MultimodalStats, SampleEncoder, read_jsonl
from ernie_jax.data.tokenizer import EMBEDDED_DIR
from ernie_jax.errors import DataError
from ernie_jax.model.positions import IMAGE

EMBEDDED_PROMPTS = os.path.join(EMBEDDED_DIR, "rl", "prompts.jsonl")
EMBEDDED_PROMPTS_EVAL = os.path.join(EMBEDDED_DIR, "rl", "eval.jsonl")
EMBEDDED_WARMUP = os.path.join(EMBEDDED_DIR, "rl", "sft.jsonl")
# the digits task for VL models: "Which digit is this?" -> "It is a seven."
EMBEDDED_VL_PROMPTS = os.path.join(EMBEDDED_DIR, "rl", "vl_prompts.jsonl")
EMBEDDED_VL_PROMPTS_EVAL = os.path.join(EMBEDDED_DIR, "rl", "vl_eval.jsonl")


@dataclasses.dataclass(frozen=True)
class PromptVision:
    """A VL prompt's vision side, as the multimodal pipeline encodes it."""

    positions: np.ndarray  # [P, 3] 3D RoPE positions of the prompt tokens
    patches: np.ndarray  # [n, C*P*P] every image's / video's patches, in order of appearance
    items: np.ndarray  # [k, 4] (kind, t, h, w) per image / video

    def pieces(self):
        """(kind, patches, (t, h, w)) per image / video."""
        offset = 0
        for kind, t, h, w in self.items.tolist():
            yield kind, self.patches[offset : offset + t * h * w], (t, h, w)
            offset += t * h * w


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # the rendered prompt up to `Assistant: `
    text: str  # the last user message's text (what a reward function sees as the prompt)
    sample: dict  # the JSONL object: "answer", "reward" and anything a reward function reads
    vision: PromptVision | None = None  # VL models: positions, patches and items (None: text only)

    def next_position(self) -> int:
        """Position of the first answer token (after the largest 3D position of a VL prompt)."""
        return len(self.ids) if self.vision is None else int(self.vision.positions.max()) + 1


def _messages(obj: dict) -> list:
    messages = obj.get("messages") or [{"role": "user", "content": obj["prompt"]}]
    if not isinstance(messages, list) or not messages:
        raise ValueError
    return messages


def _user_text(messages: list) -> str:
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    last = users[-1] if users else ""
    if isinstance(last, list):  # segments: the text ones
        return "".join(str(s["text"]) for s in last if isinstance(s, dict) and "text" in s)
    return str(last)


def read_prompts(
    source: str, tokenizer, mode: str, max_len: int, embedded: str = EMBEDDED_PROMPTS, cfg=None
) -> tuple[list[Prompt], MultimodalStats]:
    """Usable prompts of `source` ('embedded': `embedded`) at most `max_len` tokens long. With `cfg`
    of a VL model (vision.enabled), images are encoded and each row may hold
    data.max_patches / data.batch_size patches."""
    raw, stats = read_jsonl(source, embedded, lambda base, obj: (base, obj, _messages(obj)))
    vl = cfg is not None and cfg.vision.enabled
    encoder = (
        SampleEncoder(cfg, tokenizer, stats, cfg.data.max_patches // cfg.data.batch_size) if vl else None
    )
    begin, _ = markers(tokenizer)
    out = []
    for base, obj, messages in raw:
        images = obj.get("images") or []
        vision = None
        try:
            if not vl:
                if images or obj.get("video"):
                    raise ChatError("vision_in_text_model")
                ids = prompt_ids(tokenizer, messages, mode)
            else:
                if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                    raise ChatError("bad_json")
                enc = encoder((base, render_prompt(messages, mode, begin, images), False))
                if enc is None:  # counted by the encoder (missing file, bad image, too many patches)
                    continue
                ids = enc["tokens"].tolist()
                vision = PromptVision(enc["pos3"], enc["patches"], enc["items"])
        except ChatError as e:
            stats.add(str(e))
            continue
        if len(ids) > max_len:
            stats.add("too_long")
            continue
        out.append(Prompt(tuple(ids), _user_text(messages), obj, vision))
    if not out:
        raise DataError(f"data.source={source} holds no usable prompt ({stats.summary()})")
    stats.samples = len(out)
    return out, stats


def vision_arguments(prompts: list[Prompt], patch_budget: int) -> dict:
    """generate()'s image / video arguments for a batch of VL prompts (patches in row order, padded
    to `patch_budget`); {} for text prompts."""
    if all(p.vision is None for p in prompts):
        return {}
    pieces = [piece for p in prompts if p.vision is not None for piece in p.vision.pieces()]
    out = {"patch_budget": patch_budget}
    for kind, pix, grid in (
        (IMAGE, "pixel_values", "image_grid_thw"),
        (None, "pixel_values_videos", "video_grid_thw"),
    ):
        chosen = [(x, g) for k, x, g in pieces if (k == IMAGE) == (kind == IMAGE)]
        if chosen:
            out[pix] = np.concatenate([x for x, _ in chosen])
            out[grid] = np.asarray([g for _, g in chosen], np.int64)
    return out


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
