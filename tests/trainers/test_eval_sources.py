"""Held-out sources (data.eval_source) and sampled prompts (log.sample_prompts) during training: each
source is scored once per eval, to the same loss as `python -m ernie_jax.evaluate` gives the saved
checkpoint (text and chat), bits per byte from the tokens' bytes; the samples are the greedy
continuations `ernie_jax.generate` gives that checkpoint."""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np

import ernie_jax
from ernie_jax.data.chat import EMBEDDED_CHAT
from ernie_jax.data.tokenizer import EMBEDDED_DIR, Tokenizer

SETS = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "moe.intermediate_size=32",
    "moe.dispatch=dropless",  # the eval model equals the one the evaluate CLI loads (no capacity drops)
    "data.seq_len=64",
    "data.batch_size=4",
    "train.steps=4",
    "train.eval_interval=4",
    "train.eval_steps=50",
    "checkpoint.async_save=false",
    "log.sample_max_new_tokens=6",
]


def _run(module, *args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=600, env=env
    )


def _verses(n):
    """n short KJV sentences, each one document that fits one 64-token window."""
    tok = Tokenizer()
    text = gzip.open(os.path.join(EMBEDDED_DIR, "kjv.txt.gz"), "rt").read()[200_000:300_000]
    docs = [s.strip() + "." for s in text.split(". ") if 40 < len(s) < 160]
    return [d for d in docs if len(tok.encode(d)) + 2 <= 65][:n]


def test_sources_are_scored_like_the_evaluate_cli_and_samples_like_generate(tmp_path):
    docs = _verses(30)
    (tmp_path / "verses.txt").write_text("\n\n".join(docs) + "\n")
    with open(EMBEDDED_CHAT) as f:
        (tmp_path / "chat.jsonl").write_text("".join(f.readlines()[:12]))
    work = tmp_path / "w"
    prompts = ["In the beginning", "And the LORD said unto"]
    sets = SETS + [
        f"data.eval_source=[verses={tmp_path / 'verses.txt'}, {tmp_path / 'chat.jsonl'}]",
        f"log.sample_prompts=[{', '.join(prompts)}]",
    ]
    args = ["--config", "configs/tiny_moe.yaml", "--workdir", str(work)]
    r = _run("ernie_jax.train", *args, *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(
        r"eval @ 4: loss [\d.]+  ppl [\d.]+  bpb [\d.]+ \| verses: loss .* \| chat: loss", r.stdout
    )
    rows = [json.loads(x) for x in open(work / "metrics.jsonl")]
    ev = next(x for x in rows if "eval/verses/loss" in x)

    # every token of the text source scored once: the last batch is padded, nothing repeats
    tok = Tokenizer()
    assert ev["eval/verses/tokens"] == sum(len(tok.encode(d)) + 1 for d in docs)
    cli = _run(
        "ernie_jax.evaluate",
        "--checkpoint",
        str(work),
        "--seq_len",
        "64",
        "--json",
        "--data",
        f"{tmp_path / 'verses.txt'},{tmp_path / 'chat.jsonl'}",
    )
    assert cli.returncode == 0, cli.stderr
    verses, chat = [json.loads(x) for x in cli.stdout.strip().splitlines()]
    np.testing.assert_allclose(ev["eval/verses/loss"], verses["loss"], rtol=1e-5)
    np.testing.assert_allclose(ev["eval/chat/loss"], chat["loss"], rtol=1e-5)
    assert ev["eval/chat/tokens"] == chat["tokens"]
    # bits per byte: the same NLL over the bytes the tokens stand for (the CLI counts the text's bytes)
    np.testing.assert_allclose(ev["eval/verses/bpb"], verses["bits_per_byte"], rtol=1e-5)
    np.testing.assert_allclose(ev["eval/chat/bpb"], chat["bits_per_byte"], rtol=1e-5)
    total_bytes = sum(len(d.encode()) for d in docs)
    nll_bits = ev["eval/verses/loss"] * ev["eval/verses/tokens"] / np.log(2)
    np.testing.assert_allclose(nll_bits / ev["eval/verses/bpb"], total_bytes, rtol=1e-6)

    samples = [json.loads(x) for x in open(work / "samples.jsonl")]
    assert [s["prompt"] for s in samples] == prompts and {s["step"] for s in samples} == {4}
    model = ernie_jax.load_pretrained(str(work))
    for s, p in zip(samples, prompts):
        got = ernie_jax.generate(model, [[tok.bos_id, *tok.encode(p)]], max_new_tokens=6, temperature=0.0)
        ids = got.tokens[0, : got.lengths[0]].tolist()
        assert s["completion"] == tok.decode([i for i in ids if i != tok.eos_id])
        assert f"sample @ 4: {p!r}" in r.stdout
