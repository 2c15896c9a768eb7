"""python -m ernie_jax.generate on a tiny random HF model with the embedded tokenizer: one streamed
prompt, a JSONL batch with chat messages, and one-line errors for bad requests."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import ernie_jax
from ernie_jax.data.chat import prompt_ids
from ernie_jax.data.images import load_rgb, preprocess_frames
from ernie_jax.data.tokenizer import EMBEDDED_DIR, Tokenizer
from tests.hf_reference import make_hf_model, make_hf_vl_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    _, path = make_hf_model(tmp, moe=True, layers=2, vocab=4096)
    shutil.copy(os.path.join(EMBEDDED_DIR, "tokenizer.model"), path)
    return path


def _run(*args):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "ernie_jax.generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_one_prompt_streams_the_greedy_continuation(checkpoint):
    r = _run(
        "--checkpoint",
        checkpoint,
        "--prompt",
        "In the beginning",
        "--temperature",
        "0",
        "--max_new_tokens",
        "8",
        "--layers",
        "scanned",  # the API call below decodes unrolled (the CPU default): the same text
    )
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(checkpoint)
    model = ernie_jax.load_pretrained(checkpoint)
    got = ernie_jax.generate(
        model, [[tok.bos_id, *tok.encode("In the beginning")]], max_new_tokens=8, temperature=0.0
    )
    ids = got.tokens[0, : got.lengths[0]].tolist()
    ids = ids[:-1] if ids and ids[-1] == tok.eos_id else ids
    assert r.stdout == tok.decode(ids) + "\n"


def test_batch_of_prompts_and_conversations_to_jsonl(checkpoint, tmp_path):
    prompts = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "And God said", "id": 1},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"}]},
        {"prompt": "Let there be light"},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "o.jsonl"
    args = [
        "--checkpoint",
        checkpoint,
        "--prompts",
        str(prompts),
        "--output",
        str(out),
        "--max_new_tokens",
        "6",
    ]
    r = _run(*args, "--batch_size", "2", "--mode", "no_thinking", "--seed", "5")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g.get("id") for g in got] == [1, None, None] and got[1]["messages"] == rows[1]["messages"]
    for g in got:
        assert 1 <= len(g["tokens"]) <= 6 and len(g["logprobs"]) == len(g["tokens"])
        assert g["finish"] in ("eos", "length") and all(lp <= 0 for lp in g["logprobs"])
    # the conversation was rendered in the chat format, no_thinking block included
    tok = Tokenizer(checkpoint)
    ids = prompt_ids(tok, rows[1]["messages"], "no_thinking")
    parts = ["Be brief.", "\n", "User: ", "Who?", "\n", "Assistant: ", "<think>\n\n</think>\n\n"]
    assert ids == [tok.bos_id] + [i for t in parts for i in tok.encode(t)]
    again = _run(
        *args[:-4],
        "--output",
        str(tmp_path / "again.jsonl"),
        "--max_new_tokens",
        "6",
        "--batch_size",
        "2",
        "--mode",
        "no_thinking",
        "--seed",
        "5",
    )
    assert again.returncode == 0
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()  # the same seed, the same samples


def test_bad_requests_fail_in_one_line(checkpoint, tmp_path):
    base = ["--checkpoint", checkpoint]
    cases = [
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "a", "--top_p", "0"], "top_p=0.0"),
        (["--prompt", "a", "--max_new_tokens", "0"], "max_new_tokens=0"),
        (["--prompt", "a", "--temperature", "-1"], "temperature=-1.0"),
        (["--prompt", "a", "--max_new_tokens", "100000000"], "max_position_embeddings"),
    ]
    for extra, needle in cases:
        r = _run(*base, *extra)
        assert r.returncode == 2 and needle in r.stderr, (extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("tokenizer.model"))
    r = _run("--checkpoint", str(bare), "--prompt", "a")
    assert r.returncode == 2 and "pass --tokenizer" in r.stderr
    os.makedirs(tmp_path / "run" / "checkpoints")
    r = _run("--checkpoint", str(tmp_path / "run"), "--prompt", "a")
    assert r.returncode == 2 and "no checkpoints yet" in r.stderr
    r = _run(*base, "--prompt", "a", "--image", str(tmp_path / "none.png"))
    assert r.returncode == 2 and "--image" in r.stderr and "no such file" in r.stderr
    r = _run(*base, "--prompt", "a", "--image", os.path.join(EMBEDDED_DIR, "mnist", "00000.png"))
    assert r.returncode == 2 and "images need a VL checkpoint" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_images_with_a_vl_checkpoint(tmp_path):
    """--image on a VL checkpoint: the digit becomes its start marker, 4 placeholders (28 x 28 is
    resized to 56 x 56: 2 x 2 merged patches) and its end marker before the text; a JSONL batch
    takes per-line images (paths relative to the file) and gives the same tokens."""
    vl_ids = dict(
        zip(
            [
                f"{k}_token_id"
                for k in ("image", "image_start", "image_end", "video", "video_start", "video_end")
            ],
            range(4096, 4102),
        )
    )
    _, path = make_hf_vl_model(tmp_path, vocab=4104, tokens=vl_ids)
    shutil.copy(os.path.join(EMBEDDED_DIR, "tokenizer.model"), path)
    image = os.path.join(EMBEDDED_DIR, "mnist", "00003.png")
    r = _run(
        "--checkpoint",
        path,
        "--prompt",
        "This digit is",
        "--image",
        image,
        "--temperature",
        "0",
        "--max_new_tokens",
        "5",
    )
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(path)
    model = ernie_jax.load_pretrained(path)
    pix, grid = preprocess_frames([load_rgb(image)])
    assert grid == (1, 4, 4)
    prompt = [tok.bos_id, 4097, *[4096] * 4, 4098, *tok.encode("This digit is")]
    got = ernie_jax.generate(
        model,
        [prompt],
        max_new_tokens=5,
        temperature=0.0,
        eos_token_ids=[tok.eos_id],
        pixel_values=pix,
        image_grid_thw=np.array([grid]),
    )
    ids = got.tokens[0, : got.lengths[0]].tolist()
    assert r.stdout == tok.decode([i for i in ids if i != tok.eos_id]) + "\n"
    shutil.copy(image, tmp_path / "digit.png")
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"prompt": "Plain text"})
        + "\n"
        + json.dumps({"prompt": "This digit is", "images": ["digit.png"]})
    )
    r = _run(
        "--checkpoint",
        path,
        "--prompts",
        str(tmp_path / "p.jsonl"),
        "--temperature",
        "0",
        "--max_new_tokens",
        "5",
        "--output",
        str(tmp_path / "o.jsonl"),
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[1]["tokens"] == ids and rows[1]["images"] == ["digit.png"]
