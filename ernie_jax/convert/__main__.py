"""python -m ernie_jax.convert hf-to-ernie SRC DST | ernie-to-hf SRC DST"""

from __future__ import annotations

import argparse
import sys

from ernie_jax.errors import ErnieJaxError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ernie_jax.convert",
        description="Convert ERNIE 4.5 checkpoints between Hugging Face and ernie_jax.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-ernie", help="HF directory -> orbax checkpoint the trainer can start from")
    a.add_argument("src")
    a.add_argument("dst")
    a.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype recorded"
    )
    b = sub.add_parser("ernie-to-hf", help="ernie_jax checkpoint -> HF directory transformers can load")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--shard-gb", type=float, default=2.0, help="max safetensors shard size")
    b.add_argument("--step", type=int, help="training workdir: this checkpoint step (default: newest good)")
    b.add_argument(
        "--export-dtype",
        "--dtype",
        dest="export_dtype",
        default="float32",
        choices=["bfloat16", "float32"],
        help="dtype of the written tensors",
    )
    lora = b.add_mutually_exclusive_group()
    lora.add_argument(
        "--merge-lora", action="store_true", help="LoRA run: write full weights W + scale * A B"
    )
    lora.add_argument(
        "--lora-adapter",
        action="store_true",
        help="LoRA run: write only the adapters as a PEFT directory (adapter_config.json + safetensors)",
    )
    for p in (a, b):
        p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from ernie_jax.convert import convert

    try:
        if args.command == "hf-to-ernie":
            convert.hf_to_ernie(args.src, args.dst, dtype=args.dtype, quiet=args.quiet)
        else:
            convert.ernie_to_hf(
                args.src,
                args.dst,
                shard_bytes=int(args.shard_gb * (1 << 30)),
                quiet=args.quiet,
                step=args.step,
                dtype=args.export_dtype,
                merge_lora=args.merge_lora,
                lora_adapter=args.lora_adapter,
            )
    except ErnieJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"done: {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
