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
"""

from __future__ import annotations

import json
import os

import numpy as np

OUT = os.path.join(os.path.dirname(__file__), "..", "ernie_jax", "data", "embedded", "rl")


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


if __name__ == "__main__":
    main()
