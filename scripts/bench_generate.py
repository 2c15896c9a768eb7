"""Generation speed of ernie_jax (KV cache, one jitted prefill + while_loop) vs transformers'
`generate` (PyTorch eager, its dynamic KV cache) on the same random tiny MoE, fp32, CPU, greedy.

    python scripts/bench_generate.py [--config configs/tiny_moe.yaml --prompt 64 --new 256 --batch 1,8]

The model is `--config` (default: the tiny MoE of the default run) with random weights, exported
with `save_pretrained` and loaded by transformers, so both run the same parameters; both are
checked to produce the same greedy tokens first. Prefill time is a 1-new-token call; decode
tokens/s = batch x (new - 1) / (time(new) - time(1)). Ours decodes with the layers one by one (the
CPU default); the same decode with the layers scanned (the GPU / TPU default) is printed too. No
end token can stop a row early. Each time is the best of `--repeats` warm calls; transformers runs
in a child process after ours.
Target: decode >= 3x.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

import jax
import numpy as np
import transformers
from flax import nnx

import ernie_jax
from ernie_jax.config import load_config
from ernie_jax.model import build_model


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (compiles once per shape)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _transformers(path: str, shapes: list, prompt: int, new: int, repeats: int, vocab: int, out) -> None:
    """Child process: transformers' timings and greedy tokens per batch size (its own thread pool:
    PyTorch's spinning worker threads slow XLA's in the same process)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    never = vocab + 7
    result = {"threads": torch.get_num_threads()}
    for b in shapes:
        ids = torch.tensor(_prompts(b, prompt, vocab), dtype=torch.long)

        def theirs(n):
            with torch.no_grad():
                return hf.generate(
                    ids,
                    attention_mask=torch.ones(ids.shape, dtype=torch.long),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=never,
                    pad_token_id=0,
                )

        tokens = theirs(16)[:, prompt:].numpy()
        result[b] = (_best(lambda: theirs(1), repeats), _best(lambda: theirs(new), repeats), tokens)
    out.put(result)


def _prompts(b: int, prompt: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(b).integers(5, vocab, (b, prompt)).astype(np.int32)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny_moe.yaml")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    cfg = load_config(a.config, ["model.mtp_depth=0", "model.dtype=float32", "moe.dispatch=dropless"])
    model = build_model(cfg, nnx.Rngs(0))
    path = os.path.join(tempfile.mkdtemp(prefix="bench-generate-"), "hf")
    ernie_jax.save_pretrained(model, path)
    vocab = cfg.model.vocab_size
    never = vocab + 7  # an id no model emits: every row runs the full length
    shapes = [int(x) for x in a.batch.split(",")]
    ours = {}
    for b in shapes:
        ids = _prompts(b, a.prompt, vocab)
        run = lambda n, unroll=None: ernie_jax.generate(
            model, ids, max_new_tokens=n, temperature=0.0, eos_token_ids=[never], unroll_layers=unroll
        )
        t1 = _best(lambda: run(1), a.repeats)
        scanned = _best(lambda: run(a.new, False), a.repeats)
        ours[b] = (t1, _best(lambda: run(a.new), a.repeats), run(16).tokens, scanned)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_transformers, args=(path, shapes, a.prompt, a.new, a.repeats, vocab, queue))
    child.start()
    theirs = queue.get()
    child.join()
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(
        f"model {a.config}: {params / 1e6:.1f}M params, prompt {a.prompt}, {a.new} new tokens, fp32 CPU, "
        f"greedy; transformers {transformers.__version__} with {theirs['threads']} torch threads"
    )
    for b in shapes:
        (o1, on, otok, scanned), (t1, tn, ttok) = ours[b], theirs[b]
        o_dec, t_dec = b * (a.new - 1) / (on - o1), b * (a.new - 1) / (tn - t1)
        s_dec = b * (a.new - 1) / (scanned - o1)
        print(
            f"batch {b}: greedy tokens equal: {np.array_equal(otok, ttok)}; prefill tokens/s ours "
            f"{b * a.prompt / o1:7.0f} transformers {b * a.prompt / t1:7.0f} ({t1 / o1:4.2f}x); decode "
            f"tokens/s ours {o_dec:6.0f} transformers {t_dec:6.0f} ({o_dec / t_dec:4.2f}x, target >= 3x); "
            f"layers scanned {s_dec:6.0f} ({s_dec / t_dec:4.2f}x)"
        )


if __name__ == "__main__":
    main()
