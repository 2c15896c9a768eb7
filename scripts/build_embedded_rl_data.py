"""Build the embedded verifiable task in ernie_jax/data/embedded/rl/ (generated, no outside source):

    python scripts/build_embedded_rl_data.py

Questions "Which is larger, a or b?" with two different numbers in 0..99; the answer is the larger
one. Copying either number is right half the time, so sampled groups disagree and carry signal, and
the rule (compare tens, then units) transfers to pairs never seen:
- prompts.jsonl: 600 prompts {"prompt", "answer"} for RL (numeric reward);
- eval.jsonl: 200 other pairs, held out (accuracy before / after RL);
- sft.jsonl: a format warm-up of 400 chats on other pairs whose reply is either number at random
  ("Which is larger, 3 or 41?" -> "3" or "41"): it teaches the form of an answer, not which one is right,
  so held-out accuracy starts near chance (50%) and what RL adds is the comparison.

and a task with images (VL models), from the embedded digits (../mnist/captions.jsonl) and the VL chat
warm-up (../chat/sft_vl.jsonl: 600 digits, "Which digit is this?" -> "It is a seven."):
- vl_prompts.jsonl: the 600 warm-up digits as prompts {"images", "prompt", "answer"} (exact reward);
- vl_eval.jsonl: 200 of the 400 digits the warm-up never shows, held out.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

EMBEDDED = os.path.join(os.path.dirname(__file__), "..", "ernie_jax", "data", "embedded")
OUT = os.path.join(EMBEDDED, "rl")


def _write(name: str, rows: list[dict]) -> None:
    with open(os.path.join(OUT, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    pairs = [(a, b) for a in range(100) for b in range(100) if a != b]
    order = rng.permutation(len(pairs))
    item = lambda a, b: {"prompt": f"Which is larger, {a} or {b}?", "answer": str(max(a, b))}
    train = [item(*pairs[i]) for i in order[:600]]
    held = [item(*pairs[i]) for i in order[600:800]]
    _write("prompts.jsonl", train)
    _write("eval.jsonl", held)
    warm = [pairs[i] for i in order[800:1200]]
    _write(
        "sft.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"Which is larger, {a} or {b}?"},
                    {"role": "assistant", "content": str((a, b)[int(rng.integers(2))])},
                ]
            }
            for a, b in warm
        ],
    )
    _write_vl()


def _write_vl() -> None:
    with open(os.path.join(EMBEDDED, "mnist", "captions.jsonl")) as f:
        label = {}
        for line in f:
            content = json.loads(line)["content"]
            if "image" in content[0]:
                label[content[0]["image"]] = re.fullmatch(r"a handwritten digit (\w+)", content[1]["text"])[1]
    with open(os.path.join(EMBEDDED, "chat", "sft_vl.jsonl")) as f:
        warm = [json.loads(line)["messages"][0]["content"][0]["image"] for line in f]
    item = lambda path: {
        "images": [path],
        "prompt": "Which digit is this?",
        "answer": f"It is a {label[os.path.basename(path)]}.",
    }
    _write("vl_prompts.jsonl", [item(p) for p in warm])
    seen = {os.path.basename(p) for p in warm}
    unseen = sorted(name for name in label if name not in seen)
    _write("vl_eval.jsonl", [item(f"../mnist/{name}") for name in unseen[:200]])


if __name__ == "__main__":
    main()
