"""Chat (SFT) and preference (DPO) samples rendered in the ERNIE 4.5 chat format.

    <|begin_of_sentence|>{system}\n
    User: {user}\nAssistant: {answer}<|end_of_sentence|>
    User: ...

Only assistant tokens (the answer and its end marker) are trained. `data.chat_mode`:
- plain: answers as given (the text ERNIE 4.5 chat models);
- thinking: an assistant message's `reasoning` is rendered `<think>\n...\n</think>\n\n` before the
  answer and trained with it;
- no_thinking: an empty `<think>\n\n</think>\n\n` block follows `Assistant: ` as part of the prompt
  (how the thinking-capable models are asked not to think).
The two markers map to single tokens when the tokenizer has them (ERNIE's does), else to bos / eos.

Message content is a string or a list of segments ({"text"}, {"image": path}, {"video": [paths]});
a top-level "images" list is put in front of the first user message.
"""

from __future__ import annotations

import gzip
import json
import os

from ernie_jax.data.tokenizer import EMBEDDED_DIR
from ernie_jax.paths import as_path

EMBEDDED_CHAT = os.path.join(EMBEDDED_DIR, "chat", "sft.jsonl")
EMBEDDED_PREFERENCE = os.path.join(EMBEDDED_DIR, "chat", "preference.jsonl")
BEGIN, END = "<|begin_of_sentence|>", "<|end_of_sentence|>"
ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A conversation that cannot be used; `.reason` names the MultimodalStats counter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def is_chat_file(path: str) -> bool:
    """A JSONL file whose first record has "messages" (else: text documents); reads that line only."""
    if not path.endswith((".jsonl", ".jsonl.gz")):
        return False
    with as_path(path).open("rb") as raw:
        lines = gzip.open(raw) if path.endswith(".gz") else raw
        for line in lines:
            if line.strip():
                try:
                    return isinstance(json.loads(line).get("messages"), list)
                except (ValueError, AttributeError):
                    return False
    return False


def end_ids(tokenizer, model_eos: int) -> list[int]:
    """The ids that end a generated answer: the model's eos, the tokenizer's and the chat format's
    end marker when the vocabulary has it."""
    end = tokenizer.piece_id(END)
    return sorted({model_eos, tokenizer.eos_id, *([end] if end is not None else [])})


def markers(tokenizer) -> tuple[int, int]:
    b, e = tokenizer.piece_id(BEGIN), tokenizer.piece_id(END)
    return (tokenizer.bos_id if b is None else b), (tokenizer.eos_id if e is None else e)


def _segments(content, train: bool) -> list[dict]:
    if isinstance(content, str):
        return [{"text": content, "train": train}]
    if not isinstance(content, list):
        raise ChatError("bad_json")
    out = []
    for seg in content:
        if not isinstance(seg, dict):
            raise ChatError("bad_json")
        out.append({**seg, "train": train} if "text" in seg else dict(seg))
    return out


def render_prompt(messages: list, mode: str, begin: int, images=()) -> list[dict]:
    """Segments of everything up to and including the final `Assistant: ` (nothing trained)."""
    segs, first_user = [{"ids": [begin], "train": False}], True
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES or (role == "system" and i > 0):
            raise ChatError("bad_role")
        if role == "system":
            segs += _segments(m.get("content", ""), False) + [{"text": "\n", "train": False}]
        elif role == "user":
            segs.append({"text": "User: ", "train": False})
            if first_user:
                segs += [{"image": p} for p in images]
                first_user = False
            segs += _segments(m.get("content", ""), False) + [{"text": "\n", "train": False}]
        else:
            raise ChatError("bad_role")  # assistant turns inside a prompt are rendered by render_chat
    segs.append({"text": "Assistant: ", "train": False})
    if mode == "no_thinking":
        segs.append({"text": "<think>\n\n</think>\n\n", "train": False})
    return segs


def render_answer(message, mode: str, end: int) -> list[dict]:
    """The trained part of one assistant turn."""
    if isinstance(message, str):
        message = {"role": "assistant", "content": message}
    if not isinstance(message, dict) or message.get("role", "assistant") != "assistant":
        raise ChatError("bad_role")
    content = message.get("content", "")
    if not (content.strip() if isinstance(content, str) else content):
        raise ChatError("empty_response")
    segs = []
    if mode == "thinking" and message.get("reasoning"):
        segs.append({"text": f"<think>\n{message['reasoning']}\n</think>\n\n", "train": True})
    return segs + _segments(content, True) + [{"ids": [end], "train": True}]


def render_chat(messages: list, mode: str, begin: int, end: int, images=()) -> list[dict]:
    """A whole conversation: every assistant turn trained, everything else not."""
    if not isinstance(messages, list):
        raise ChatError("bad_json")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise ChatError("no_reply")  # nothing to train on
    segs, pending = [], []
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant":
            prompt = render_prompt(pending, mode, begin, images if not segs else ())
            segs += prompt if not segs else prompt[1:]  # one begin marker per conversation
            segs += render_answer(m, mode, end)
            pending = []
        else:
            pending.append(m)
    return segs


def prompt_ids(tokenizer, messages: list, mode: str) -> list[int]:
    """Token ids of a text conversation's prompt up to `Assistant: ` (generation), each segment
    encoded on its own exactly as the SFT data pipeline encodes it."""
    begin, _ = markers(tokenizer)
    ids = []
    for seg in render_prompt(messages, mode, begin):
        if "ids" in seg:
            ids += [int(i) for i in seg["ids"]]
        elif "text" in seg:
            ids += tokenizer.encode(str(seg["text"]))
        else:
            raise ChatError("vision_in_text_model")
    return ids
