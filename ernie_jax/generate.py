"""python -m ernie_jax.generate --checkpoint DIR --prompt "..." [--chat] [--mode ...] [sampling flags]

DIR is a Hugging Face directory, a converted (hf-to-ernie) directory or a training workdir. One
prompt streams its text as it is produced; `--prompts FILE.jsonl --output OUT.jsonl` runs a batch
(each line {"prompt": str} or {"messages": [...]}; each output line adds "completion", "tokens",
"logprobs" and "finish": "eos" | "length").
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ernie_jax.convert import load_pretrained
from ernie_jax.convert.run_export import checkpoint_tokenizer
from ernie_jax.data.chat import END, ChatError, prompt_ids
from ernie_jax.data.tokenizer import Tokenizer
from ernie_jax.errors import ConfigError, DataError, ErnieJaxError
from ernie_jax.generation import generate, pad_prompts
from ernie_jax.paths import as_path

PAD_TO = 32  # prompt lengths are padded up to a multiple: nearby lengths share one compiled program


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ernie_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="HF directory, converted directory or training workdir"
    )
    p.add_argument("--step", type=int, help="training workdir: this checkpoint step (default: newest good)")
    p.add_argument(
        "--tokenizer", help="directory with tokenizer.model / tokenizer.json (default: the checkpoint's)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (text, or the user message with --chat)")
    src.add_argument("--prompts", help="JSONL of {'prompt': ...} or {'messages': [...]} lines")
    p.add_argument("--output", help="with --prompts: JSONL to write (default: standard output)")
    p.add_argument(
        "--chat", action="store_true", help="render --prompt as a user turn of the ERNIE chat format"
    )
    p.add_argument("--mode", default="plain", choices=["plain", "thinking", "no_thinking"], help="chat mode")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (ERNIE recommends 0.8)")
    p.add_argument("--top_p", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8, help="with --prompts: prompts per batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    return p


def read_requests(args) -> list:
    """[(request dict, messages or None)] from --prompt or --prompts, checked before the model loads."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ConfigError('--prompt is empty: give some text, e.g. --prompt "Once upon a time"')
        req = {"prompt": args.prompt}
        return [(req, [{"role": "user", "content": args.prompt}] if args.chat else None)]
    try:
        lines = as_path(args.prompts).read_text().splitlines()
    except OSError as e:
        raise DataError(f"--prompts {args.prompts}: cannot read it ({e.strerror or e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except ValueError as e:
            raise DataError(f"--prompts {args.prompts} line {n} is not JSON ({e})") from None
        if not isinstance(req, dict) or not (
            isinstance(req.get("prompt"), str) or isinstance(req.get("messages"), list)
        ):
            raise DataError(
                f"--prompts {args.prompts} line {n}: needs a 'prompt' string or a 'messages' list"
            )
        if isinstance(req.get("messages"), list):
            out.append((req, req["messages"]))
        else:
            if not req["prompt"].strip():
                raise DataError(f"--prompts {args.prompts} line {n}: the prompt is empty")
            out.append((req, [{"role": "user", "content": req["prompt"]}] if args.chat else None))
    if not out:
        raise DataError(f"--prompts {args.prompts} has no prompts")
    return out


def encode(tok: Tokenizer, prompt: str, messages, mode: str) -> list[int]:
    if messages is None:
        return [tok.bos_id, *tok.encode(prompt)]
    try:
        return prompt_ids(tok, messages, mode)
    except ChatError as e:
        raise DataError(
            f"cannot render the conversation ({e.reason}): roles must be system?, user, ..."
        ) from None


class _Stream:
    """Prints the text of row 0 as its tokens arrive (decoding the whole prefix each time, so
    multi-token characters come out whole)."""

    def __init__(self, tok: Tokenizer, ends: set[int]):
        self.tok, self.ends, self.ids, self.shown, self.done = tok, ends, [], "", False

    def __call__(self, step, tokens):
        token = int(np.asarray(tokens)[0])
        if self.done or token in self.ends:
            self.done = True
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()
        self.shown = text


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.output and not args.prompts:
            raise ConfigError("--output goes with --prompts FILE.jsonl")
        if args.batch_size < 1:
            raise ConfigError(f"--batch_size {args.batch_size} must be >= 1")
        requests = read_requests(args)
        tok = checkpoint_tokenizer(args.checkpoint, args.tokenizer, args.step)
        prompts = [encode(tok, r.get("prompt", ""), msgs, args.mode) for r, msgs in requests]
        model = load_pretrained(args.checkpoint, dtype=args.dtype, step=args.step)
        m = model.model_cfg
        end_marker = tok.piece_id(END)
        ends = sorted({m.eos_token_id, tok.eos_id, *([end_marker] if end_marker is not None else [])})
        sampling = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            eos_token_ids=ends,
        )
        if args.prompt is not None:
            ids, lengths = pad_prompts(prompts, m.pad_token_id, PAD_TO)
            stream = _Stream(tok, set(ends))
            generate(model, ids, prompt_lengths=lengths, seed=args.seed, stream=stream, **sampling)
            sys.stdout.write("\n")
            return 0
        out = open(args.output, "w") if args.output else sys.stdout
        try:
            for start in range(0, len(prompts), args.batch_size):
                chunk = prompts[start : start + args.batch_size]
                ids, lengths = pad_prompts(chunk, m.pad_token_id, PAD_TO)
                got = generate(model, ids, prompt_lengths=lengths, seed=args.seed + start, **sampling)
                for i, (req, _) in enumerate(requests[start : start + len(chunk)]):
                    n = int(got.lengths[i])
                    toks = got.tokens[i, :n].tolist()
                    finished = bool(toks) and toks[-1] in ends
                    text_ids = toks[:-1] if finished else toks
                    row = {
                        **req,
                        "completion": tok.decode(text_ids),
                        "tokens": toks,
                        "logprobs": [round(float(x), 6) for x in got.logprobs[i, :n]],
                        "finish": "eos" if finished else "length",
                    }
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                out.flush()
        finally:
            if out is not sys.stdout:
                out.close()
    except ErnieJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """The `ernie-jax-generate` console script."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
