"""python -m ernie_jax.evaluate: loss / perplexity / bits per byte on text and chat files, equal to
transformers' summed cross-entropy on the same tokens; chat scores assistant tokens only."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ernie_jax.data.chat import markers, render_chat
from ernie_jax.data.tokenizer import EMBEDDED_DIR, Tokenizer
from tests.hf_reference import make_hf_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _run(*args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "ernie_jax.evaluate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _hf_nll(hf, ids, scored):
    """Summed CE (nats) of the scored tokens (token t predicted from position t - 1)."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1).numpy()
    return -sum(logp[t - 1, ids[t]] for t in range(1, len(ids)) if scored[t])


def test_text_and_chat_scores_match_transformers(tmp_path):
    hf, path = make_hf_model(tmp_path, moe=True, layers=2, vocab=4096, bias_scale=0.3)
    shutil.copy(os.path.join(EMBEDDED_DIR, "tokenizer.model"), path)
    tok = Tokenizer(path)
    docs = [
        " ".join(["In the beginning God created the heaven and the earth."] * 4),
        "And the earth was void.",
    ]
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(docs) + "\n")
    chats = [
        [{"role": "user", "content": "Who made the light?"}, {"role": "assistant", "content": "God did."}],
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What came first?"},
            {"role": "assistant", "content": "Light."},
        ],
    ]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    r = _run(
        "--checkpoint", path, "--data", f"{text},{chat}", "--seq_len", "32", "--batch_size", "3", "--json"
    )
    assert r.returncode == 0, r.stderr
    text_row, chat_row = (json.loads(line) for line in r.stdout.splitlines())
    # text: [bos] + doc + [eos] in windows of 33 tokens, every token after a window's first scored
    nll, count = 0.0, 0
    for d in docs:
        ids = [tok.bos_id, *tok.encode(d), tok.eos_id]
        assert len(ids) > 40 or d == docs[1]  # the first document spans two windows
        for start in range(0, len(ids) - 1, 32):
            w = ids[start : start + 33]
            nll += _hf_nll(hf, w, [0] + [1] * (len(w) - 1))
            count += len(w) - 1
    assert text_row["tokens"] == count and text_row["bytes"] == sum(len(d.encode()) for d in docs)
    np.testing.assert_allclose(text_row["loss"], nll / count, rtol=1e-5)
    np.testing.assert_allclose(text_row["perplexity"], math.exp(nll / count), rtol=1e-4)
    np.testing.assert_allclose(text_row["bits_per_byte"], nll / math.log(2) / text_row["bytes"], rtol=1e-5)
    # chat: only the answers and their end markers are scored
    begin, end = markers(tok)
    nll, count = 0.0, 0
    for c in chats:
        ids, mask = [], []
        for seg in render_chat(c, "plain", begin, end):
            piece = seg["ids"] if "ids" in seg else tok.encode(seg["text"])
            ids += piece
            mask += [int(seg["train"])] * len(piece)
        nll += _hf_nll(hf, ids, mask)
        count += sum(mask)
    assert chat_row["tokens"] == count == sum(len(tok.encode(c[-1]["content"])) + 1 for c in chats)
    assert chat_row["bytes"] == sum(len(c[-1]["content"]) for c in chats)
    np.testing.assert_allclose(chat_row["loss"], nll / count, rtol=1e-5)


def test_bad_input_fails_in_one_line(tmp_path):
    _, path = make_hf_model(tmp_path, moe=False, layers=1, vocab=4096)
    shutil.copy(os.path.join(EMBEDDED_DIR, "tokenizer.model"), path)
    (tmp_path / "empty.txt").write_text("\n")
    for extra, needle in [
        (["--data", str(tmp_path / "missing.txt")], "no such file"),
        (["--data", str(tmp_path / "empty.txt")], "no documents"),
        (["--data", str(tmp_path / "empty.txt"), "--seq_len", "0"], "--seq_len 0"),
        (["--data", str(tmp_path / "empty.txt"), "--seq_len", "100000000"], "positions"),
    ]:
        r = _run("--checkpoint", path, *extra)
        assert r.returncode == 2 and needle in r.stderr, (extra, r.stderr)
