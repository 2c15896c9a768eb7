"""Rebuild the embedded default corpus and tokenizer shipped in ernie_jax/data/embedded/.

Source: the King James Bible (public domain) from Debian's `bible-kjv` + `bible-kjv-text`:

    apt-get download bible-kjv bible-kjv-text
    for f in bible-kjv*.deb; do dpkg-deb -x "$f" kjv; done
    kjv/usr/bin/bible -f -p kjv/usr/lib "gen1:1-rev22:21" > kjv_raw.txt
    python scripts/build_embedded_data.py kjv_raw.txt

Writes kjv.txt.gz (one chapter per document, documents separated by blank lines) and a
SentencePiece BPE tokenizer (vocab 4096, pad/bos/eos = 0/1/2 as in ERNIE) trained on it.
"""

from __future__ import annotations

import gzip
import os
import re
import sys
import tempfile

OUT = os.path.join(os.path.dirname(__file__), "..", "ernie_jax", "data", "embedded")
VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def chapters(lines):
    key, verses = None, []
    for line in lines:
        m = VERSE.match(line.strip())
        if not m:
            if line.strip() and verses:
                verses[-1] += " " + line.strip()  # wrapped continuation line
            continue
        book, chap, _, text = m.groups()
        if (book, chap) != key and verses:
            yield " ".join(verses)
            verses = []
        key = (book, chap)
        verses.append(text)
    if verses:
        yield " ".join(verses)


def main(raw_path: str) -> None:
    import sentencepiece as spm

    with open(raw_path, encoding="utf-8") as f:
        docs = list(chapters(f))
    os.makedirs(OUT, exist_ok=True)
    with gzip.open(os.path.join(OUT, "kjv.txt.gz"), "wt", encoding="utf-8", compresslevel=9) as f:
        f.write("\n\n".join(docs) + "\n")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as tmp:
        tmp.write("\n".join(docs))
    spm.SentencePieceTrainer.train(
        input=tmp.name,
        model_prefix=os.path.join(OUT, "tokenizer"),
        vocab_size=4096,
        model_type="bpe",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        character_coverage=1.0,
        max_sentence_length=100000,
        byte_fallback=True,
        num_threads=2,
    )
    os.remove(os.path.join(OUT, "tokenizer.vocab"))
    os.unlink(tmp.name)
    print(f"{len(docs)} documents, {sum(map(len, docs))} characters -> {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
