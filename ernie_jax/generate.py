"""python -m ernie_jax.generate --checkpoint DIR --prompt "..." [--chat] [--mode ...] [sampling flags]

DIR is a Hugging Face directory, a converted (hf-to-ernie) directory or a training workdir. One
prompt streams its text as it is produced; `--prompts FILE.jsonl --output OUT.jsonl` runs a batch
(each line {"prompt": str} or {"messages": [...]}, optionally "images": [paths relative to the
file]; each output line adds "completion", "tokens", "logprobs" and "finish": "eos" | "length").
VL checkpoints take images (`--image PATH ...`), placed before the prompt text (before the first
user message with --chat), resized and patched as the training pipeline does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from ernie_jax.config import DataConfig, VisionConfig
from ernie_jax.convert import load_pretrained
from ernie_jax.convert.run_export import checkpoint_tokenizer
from ernie_jax.data.chat import ChatError, end_ids, markers, render_prompt
from ernie_jax.data.images import ImageError, load_rgb, preprocess_frames
from ernie_jax.data.multimodal import vision_token_ids
from ernie_jax.model.positions import IMAGE
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
    p.add_argument(
        "--image", nargs="+", action="extend", default=[], help="images for --prompt (VL checkpoints)"
    )
    p.add_argument("--max_pixels", type=int, default=DataConfig.image_max_pixels, help="image resize bound")
    p.add_argument("--min_pixels", type=int, default=DataConfig.image_min_pixels, help="image resize bound")
    p.add_argument("--mode", default="plain", choices=["plain", "thinking", "no_thinking"], help="chat mode")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (ERNIE recommends 0.8)")
    p.add_argument("--top_p", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8, help="with --prompts: prompts per batch")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument(
        "--layers",
        default="auto",
        choices=["auto", "unrolled", "scanned"],
        help="decode the layers one by one (faster on CPU, compile time grows with depth) or scanned "
        "(compile time independent of depth); auto: unrolled on CPU only",
    )
    return p


@dataclass
class Request:
    """One prompt: the JSON the caller sent (echoed in the output), its chat messages (None: plain
    text) and its image files (resolved paths)."""

    fields: dict
    messages: list | None
    images: list[str]


def read_requests(args) -> list[Request]:
    """Requests from --prompt or --prompts, checked (text, JSON, image files) before the model loads."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ConfigError('--prompt is empty: give some text, e.g. --prompt "Once upon a time"')
        for path in args.image:
            if not os.path.isfile(path):
                raise DataError(f"--image {path}: no such file")
        req = {"prompt": args.prompt, **({"images": args.image} if args.image else {})}
        messages = [{"role": "user", "content": args.prompt}] if args.chat else None
        return [Request(req, messages, list(args.image))]
    if args.image:
        raise ConfigError('--image goes with --prompt; in --prompts files give each line "images": [paths]')
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
        images = req.get("images") or []
        if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
            raise DataError(f"--prompts {args.prompts} line {n}: 'images' must be a list of paths")
        images = [os.path.join(os.path.dirname(args.prompts), x) for x in images]
        for path in images:
            if not os.path.isfile(path):
                raise DataError(f"--prompts {args.prompts} line {n}: image {path}: no such file")
        if isinstance(req.get("messages"), list):
            out.append(Request(req, req["messages"], images))
        else:
            if not req["prompt"].strip():
                raise DataError(f"--prompts {args.prompts} line {n}: the prompt is empty")
            messages = [{"role": "user", "content": req["prompt"]}] if args.chat else None
            out.append(Request(req, messages, images))
    if not out:
        raise DataError(f"--prompts {args.prompts} has no prompts")
    return out


@dataclass
class Encoded:
    """A prompt as model inputs: token ids, and per image its patches [n, C*P*P] and grid (t, h, w)."""

    ids: list[int]
    patches: list[np.ndarray]
    grids: list[tuple[int, int, int]]


def encode(tok: Tokenizer, req: Request, mode: str, vision: VisionConfig, pixels: tuple[int, int]) -> Encoded:
    """Render a request (chat format, or bos + images + text) and encode it: text as the SFT
    pipeline encodes it, each image as its start marker, placeholders and end marker."""
    begin, _ = markers(tok)
    try:
        if req.messages is None:
            segs = [
                {"ids": [tok.bos_id]},
                *({"image": p} for p in req.images),
                {"text": req.fields["prompt"]},
            ]
        else:
            segs = render_prompt(req.messages, mode, begin, req.images)
    except ChatError as e:
        raise DataError(
            f"cannot render the conversation ({e.reason}): roles must be system?, user, ..."
        ) from None
    out = Encoded([], [], [])
    for seg in segs:
        if "ids" in seg:
            out.ids += [int(i) for i in seg["ids"]]
        elif "text" in seg:
            out.ids += tok.encode(str(seg["text"]))
        elif "image" in seg:
            if not vision.enabled:
                raise ConfigError("images need a VL checkpoint (vision.enabled); this is a text model")
            try:
                im = load_rgb(seg["image"])
                patches, grid = preprocess_frames(
                    [im],
                    patch=vision.patch_size,
                    merge=vision.spatial_merge,
                    min_pixels=pixels[0],
                    max_pixels=pixels[1],
                )
            except ImageError as e:
                raise DataError(f"image {seg['image']}: {e}") from None
            out.ids += vision_token_ids(vision, IMAGE, grid)
            out.patches.append(patches)
            out.grids.append(grid)
        else:
            raise DataError("message content segments must be {'text': ...} or {'image': path}")
    return out


def vision_inputs(rows: list[Encoded]) -> dict:
    """generate()'s image arguments for a batch: patches in row order, one grid per image."""
    patches = [p for r in rows for p in r.patches]
    if not patches:
        return {}
    grids = np.array([g for r in rows for g in r.grids], np.int64)
    return {"pixel_values": np.concatenate(patches), "image_grid_thw": grids}


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
        model = load_pretrained(args.checkpoint, dtype=args.dtype, step=args.step)
        pixels = (args.min_pixels, args.max_pixels)
        encoded = [encode(tok, r, args.mode, model.vision_cfg, pixels) for r in requests]
        m = model.model_cfg
        ends = end_ids(tok, m.eos_token_id)
        sampling = dict(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            eos_token_ids=ends,
            unroll_layers={"auto": None, "unrolled": True, "scanned": False}[args.layers],
        )
        if args.prompt is not None:
            ids, lengths = pad_prompts([e.ids for e in encoded], m.pad_token_id, PAD_TO)
            stream = _Stream(tok, set(ends))
            sampling.update(vision_inputs(encoded))
            generate(model, ids, prompt_lengths=lengths, seed=args.seed, stream=stream, **sampling)
            sys.stdout.write("\n")
            return 0
        out = open(args.output, "w") if args.output else sys.stdout
        try:
            for start in range(0, len(encoded), args.batch_size):
                chunk = encoded[start : start + args.batch_size]
                ids, lengths = pad_prompts([e.ids for e in chunk], m.pad_token_id, PAD_TO)
                got = generate(
                    model,
                    ids,
                    prompt_lengths=lengths,
                    seed=args.seed + start,
                    **sampling,
                    **vision_inputs(chunk),
                )
                for i, r in enumerate(requests[start : start + len(chunk)]):
                    req = r.fields
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
