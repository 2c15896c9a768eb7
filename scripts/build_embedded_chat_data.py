"""Rebuild the embedded chat (SFT) and preference (DPO) sets in ernie_jax/data/embedded/chat/ from the
embedded corpora (no new sources: the King James Bible text and the MNIST digits, see SOURCE.md):

    python scripts/build_embedded_chat_data.py

- sft.jsonl: 1200 conversations "Continue this passage from the King James Bible: <10 words>" ->
  the next 10 words; every third one carries a `reasoning` (used by data.chat_mode=thinking), every
  fifth has a system prompt, every seventh is two turns.
- sft_vl.jsonl: 600 conversations [digit image] "Which digit is this?" -> "It is a seven."
- preference.jsonl: 1200 pairs with the same prompts: chosen = the true next 10 words, rejected =
  10 words from another chapter.
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), "..", "ernie_jax", "data", "embedded")
OUT = os.path.join(ROOT, "chat")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _passages(rng, n):
    with gzip.open(os.path.join(ROOT, "kjv.txt.gz"), "rt") as f:
        chapters = [c.split() for c in f.read().split("\n\n") if len(c.split()) > 40]
    out = []
    for _ in range(n):
        ci = int(rng.integers(len(chapters)))
        words = chapters[ci]
        start = int(rng.integers(0, len(words) - 20))
        other = chapters[(ci + 1 + int(rng.integers(len(chapters) - 1))) % len(chapters)]
        ostart = int(rng.integers(0, len(other) - 10))
        out.append(
            (
                " ".join(words[start : start + 10]),
                " ".join(words[start + 10 : start + 20]),
                " ".join(other[ostart : ostart + 10]),
            )
        )
    return out


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    passages = _passages(rng, 1200)
    with open(os.path.join(OUT, "sft.jsonl"), "w") as f:
        for i, (a, b, _) in enumerate(passages):
            msgs = [
                {"role": "user", "content": f"Continue this passage from the King James Bible: {a}"},
                {"role": "assistant", "content": b},
            ]
            if i % 3 == 0:
                msgs[1]["reasoning"] = (
                    "These words come from the King James Bible; I recall how the verse goes on."
                )
            if i % 5 == 0:
                msgs.insert(0, {"role": "system", "content": "You know the King James Bible by heart."})
            if i % 7 == 0:
                c, d, _ = passages[(i + 1) % len(passages)]
                msgs += [
                    {"role": "user", "content": f"And this one: {c}"},
                    {"role": "assistant", "content": d},
                ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with open(os.path.join(OUT, "preference.jsonl"), "w") as f:
        for a, b, r in passages:
            f.write(
                json.dumps(
                    {
                        "prompt": f"Continue this passage from the King James Bible: {a}",
                        "chosen": b,
                        "rejected": r,
                    }
                )
                + "\n"
            )
    with open(os.path.join(ROOT, "mnist", "captions.jsonl")) as f:
        digits = [json.loads(line)["content"] for line in f]
    digits = [(c[0]["image"], c[1]["text"].split()[-1]) for c in digits if "image" in c[0]][:600]
    with open(os.path.join(OUT, "sft_vl.jsonl"), "w") as f:
        for path, name in digits:
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {
                                "role": "user",
                                "content": [{"image": f"../mnist/{path}"}, {"text": "Which digit is this?"}],
                            },
                            {"role": "assistant", "content": f"It is a {name}."},
                        ]
                    }
                )
                + "\n"
            )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
