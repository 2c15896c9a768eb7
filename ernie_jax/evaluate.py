"""python -m ernie_jax.evaluate --checkpoint DIR --data FILE[,FILE...] [--seq_len 2048 --batch_size 8]

Held-out scoring of a checkpoint (a Hugging Face directory, a converted directory or a training
workdir) on text and chat data: loss per token, perplexity and bits per byte. Bits per byte divide
the summed negative log-likelihood (in bits) by the UTF-8 bytes of the scored text, so models with
different tokenizers compare. Text files (.txt, blank-line separated documents; .jsonl with
"text") score every token after the first of each window; chat JSONL ("messages") scores the
assistant tokens only, as SFT trains them (`--mode` renders thinking / no_thinking prompts).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ernie_jax.convert import load_pretrained
from ernie_jax.convert.run_export import checkpoint_tokenizer
from ernie_jax.data.chat import ChatError, is_chat_file, markers, render_chat
from ernie_jax.data.text import read_documents, resolve_paths
from ernie_jax.errors import ConfigError, DataError, ErnieJaxError
from ernie_jax.generation import generation_split
from ernie_jax.ops.cross_entropy import token_cross_entropy
from ernie_jax.paths import as_path


@dataclass
class Score:
    """Sums over one data file: nll (nats), scored tokens, UTF-8 bytes of the scored text."""

    name: str
    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0
    sequences: int = 0

    @property
    def loss(self) -> float:
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def row(self) -> dict:
        return {
            "data": self.name,
            "loss": round(self.loss, 6),
            "perplexity": round(self.perplexity, 4),
            "bits_per_byte": round(self.bits_per_byte, 6),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "sequences": self.sequences,
        }


def text_sequences(tok, path: str, seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Documents -> windows of at most seq_len + 1 tokens ([bos] + text + [eos], cut into pieces);
    every token after a window's first is scored. Returns ([(ids, scored mask)], bytes)."""
    docs, _ = read_documents(path, max_doc_chars=1 << 30)
    seqs, nbytes = [], 0
    for text in docs:
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        nbytes += len(text.encode("utf-8"))
        for start in range(0, len(ids) - 1, seq_len):
            window = ids[start : start + seq_len + 1]
            seqs.append((window, [0] + [1] * (len(window) - 1)))
    return seqs, nbytes


def chat_sequences(
    tok, path: str, seq_len: int, mode: str
) -> tuple[list[tuple[list[int], list[int]]], int, int]:
    """Conversations -> (ids, mask of assistant tokens), counting the bytes of the scored text;
    ones longer than seq_len + 1 tokens are skipped (returned count)."""
    begin, end = markers(tok)
    seqs, nbytes, skipped = [], 0, 0
    for n, line in enumerate(as_path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            segs = render_chat(json.loads(line).get("messages"), mode, begin, end)
        except (ValueError, AttributeError, ChatError) as e:
            raise DataError(f"{path} line {n}: not a usable conversation ({e}); fix or remove it") from None
        ids, mask, scored_bytes = [], [], 0
        for seg in segs:
            if "ids" in seg:
                piece = [int(i) for i in seg["ids"]]
            elif "text" in seg:
                piece = tok.encode(str(seg["text"]))
                if seg["train"]:
                    scored_bytes += len(str(seg["text"]).encode("utf-8"))
            else:
                raise DataError(f"{path} line {n}: images need a VL checkpoint; this scores text only")
            ids += piece
            mask += [int(seg["train"])] * len(piece)
        if len(ids) > seq_len + 1:
            skipped += 1
            continue
        nbytes += scored_bytes  # of the conversations scored, not of the skipped ones
        seqs.append((ids, mask))  # the mask marks scored tokens (assistant answers and end markers)
    return seqs, nbytes, skipped


def score(model, sequences, batch_size: int, pad_id: int) -> tuple[float, int]:
    """(summed nll in nats, scored tokens) of [(ids, mask)] under `model`, in fixed-shape batches."""
    graphdef, state = generation_split(model)
    width = max(len(ids) for ids, _ in sequences)
    width = -(-width // 64) * 64  # one compiled shape for nearby lengths
    nll, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        ids = np.full((batch_size, width), pad_id, np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        seg = np.zeros((batch_size, width), np.int32)
        for i, (s, m) in enumerate(chunk):
            ids[i, : len(s)], mask[i, : len(m)], seg[i, : len(s)] = s, m, 1
        total, n = _batch_nll(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg))
        nll, count = nll + float(total), count + int(n)
    return nll, count


@functools.partial(jax.jit, static_argnums=0)
def _batch_nll(graphdef, state, ids, mask, seg):
    """mask [B,S]: token t is scored; it is predicted from position t-1 (labels = ids shifted left)."""
    logits = nnx.merge(graphdef, state)(ids, segment_ids=seg).logits
    labels = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
    scored = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    ce = token_cross_entropy(logits, labels)
    return jnp.sum(ce * scored), jnp.sum(scored)


def evaluate_files(model, tok, files: list[str], seq_len: int, batch_size: int, mode: str) -> list[Score]:
    out = []
    for path in files:
        try:
            found = resolve_paths(path)
        except DataError:
            found = []
        if not found:
            raise DataError(f"--data {path}: no such file; pass text (.txt / .jsonl) or chat (.jsonl) files")
        s = Score(path)
        if is_chat_file(path):
            seqs, s.bytes, skipped = chat_sequences(tok, path, seq_len, mode)
            if skipped:
                print(
                    f"{path}: {skipped} conversations longer than {seq_len + 1} tokens skipped",
                    file=sys.stderr,
                )
        else:
            seqs, s.bytes = text_sequences(tok, path, seq_len)
        if not seqs:
            raise DataError(f"--data {path} holds no documents or conversations to score")
        s.nll, s.tokens = score(model, seqs, batch_size, model.model_cfg.pad_token_id)
        s.sequences = len(seqs)
        out.append(s)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ernie_jax.evaluate", description=__doc__.split("\n")[2])
    p.add_argument(
        "--checkpoint", required=True, help="HF directory, converted directory or training workdir"
    )
    p.add_argument("--data", required=True, help="comma-separated text or chat files (globs allowed)")
    p.add_argument("--step", type=int, help="training workdir: this checkpoint step (default: newest good)")
    p.add_argument(
        "--tokenizer", help="directory with tokenizer.model / tokenizer.json (default: the checkpoint's)"
    )
    p.add_argument("--seq_len", type=int, default=2048, help="tokens per scored window")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--mode", default="plain", choices=["plain", "thinking", "no_thinking"], help="chat mode")
    p.add_argument("--json", action="store_true", help="print one JSON line per file")
    args = p.parse_args(argv)
    try:
        if args.seq_len < 1 or args.batch_size < 1:
            raise ConfigError(f"--seq_len {args.seq_len} and --batch_size {args.batch_size} must be >= 1")
        tok = checkpoint_tokenizer(args.checkpoint, args.tokenizer, args.step)
        model = load_pretrained(args.checkpoint, dtype="float32", step=args.step)
        limit = model.model_cfg.max_position_embeddings
        if args.seq_len + 1 > limit:
            raise ConfigError(
                f"--seq_len {args.seq_len} exceeds the model's {limit} positions; pass a smaller one"
            )
        files = [f for f in args.data.split(",") if f]
        for s in evaluate_files(model, tok, files, args.seq_len, args.batch_size, args.mode):
            if args.json:
                print(json.dumps(s.row()))
            else:
                print(
                    f"{s.name}: loss {s.loss:.4f} / token, perplexity {s.perplexity:.2f}, "
                    f"{s.bits_per_byte:.4f} bits per byte ({s.tokens} tokens, {s.bytes} bytes, "
                    f"{s.sequences} sequences)"
                )
    except ErnieJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """The `ernie-jax-evaluate` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
