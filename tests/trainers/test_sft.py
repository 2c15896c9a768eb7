"""SFT: ERNIE chat rendering with assistant-only loss, thinking modes, bad conversations counted,
the CLI on the embedded chat set, multimodal SFT, and starting from a converted HF checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from ernie_jax.config import load_config
from ernie_jax.data.chat import ChatError, render_chat
from ernie_jax.data.multimodal import MultimodalStats
from ernie_jax.data.tokenizer import Tokenizer
from ernie_jax.trainers.sft import ChatEncoder

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello.", "reasoning": "A greeting."},
    {"role": "user", "content": "Again."},
    {"role": "assistant", "content": "Hello again."},
]


def _text(segs):
    return "".join(
        s.get("text", "<B>" if s.get("ids") == [1] else "<E>") for s in segs if "text" in s or "ids" in s
    )


def _trained(segs):
    return "".join(s.get("text", "<E>") for s in segs if s.get("train"))


def test_render_plain_thinking_no_thinking():
    plain = render_chat(CONV, "plain", 1, 2)
    assert _text(plain) == (
        "<B>Be brief.\nUser: Say hello.\nAssistant: Hello.<E>User: Again.\nAssistant: Hello again.<E>"
    )
    assert _trained(plain) == "Hello.<E>Hello again.<E>"
    thinking = render_chat(CONV, "thinking", 1, 2)
    assert _trained(thinking) == "<think>\nA greeting.\n</think>\n\nHello.<E>Hello again.<E>"
    no_think = render_chat(CONV, "no_thinking", 1, 2)
    assert "Assistant: <think>\n\n</think>\n\nHello." in _text(no_think)
    assert _trained(no_think) == "Hello.<E>Hello again.<E>"


@pytest.mark.parametrize(
    "messages,reason",
    [
        ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], "bad_role"),
        ([{"role": "user", "content": "x"}], "no_reply"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}], "empty_response"),
    ],
)
def test_bad_conversations(messages, reason):
    with pytest.raises(ChatError) as e:
        render_chat(messages, "plain", 1, 2)
    assert e.value.reason == reason


def test_loss_mask_covers_assistant_tokens_only():
    cfg = load_config("configs/sft_tiny.yaml")
    tok = Tokenizer("embedded")
    stats = MultimodalStats()
    ex = ChatEncoder(cfg, tok, stats, 4)(("/", CONV, []))
    trained = ex["tokens"][ex["targets"] > 0]
    assert tok.decode(trained[trained > 2]).split() == ["Hello.", "Hello", "again."]
    assert list(trained).count(tok.eos_id) == 2
    assert ChatEncoder(cfg, tok, stats, 4)(("/", [{"role": "user", "content": "x"}], [])) is None
    assert stats.no_reply == 1


def _cli(config, workdir, *sets):
    cmd = [sys.executable, "-m", "ernie_jax.train", "--config", config, "--workdir", str(workdir)]
    for s in ["log.interval=5", "checkpoint.async_save=false", "train.eval_steps=2", *sets]:
        cmd += ["--set", s]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sft_cli_learns_on_embedded_chat(tmp_path):
    r = _cli(
        "configs/sft_tiny.yaml",
        tmp_path / "w",
        "train.steps=60",
        "train.eval_interval=60",
        "model.num_layers=2",
        "data.chat_mode=thinking",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [x for x in _rows(tmp_path / "w") if "lm_loss" in x]
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"] - 1.0
    assert "mode thinking" in r.stdout


@pytest.mark.slow
def test_multimodal_sft_cli(tmp_path):
    r = _cli(
        "configs/sft_tiny.yaml",
        tmp_path / "w",
        "train.steps=4",
        "train.eval_interval=4",
        "data.source=ernie_jax/data/embedded/chat/sft_vl.jsonl",
        "model.vocab_size=4104",
        "moe.vision_num_experts=8",
        "moe.vision_intermediate_size=64",
        "vision.enabled=true",
        "vision.depth=1",
        "vision.hidden_size=64",
        "vision.num_heads=4",
        "vision.intermediate_size=128",
        "vision.rope_t_frequencies=4",
        "vision.image_token_id=4096",
        "vision.image_start_token_id=4097",
        "vision.image_end_token_id=4098",
        "vision.video_token_id=4099",
        "vision.video_start_token_id=4100",
        "vision.video_end_token_id=4101",
        "data.max_patches=1024",
        "train.freeze=[vit]",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "vision_aux_loss" in _rows(tmp_path / "w")[0]


@pytest.mark.slow
def test_sft_from_converted_hf_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    from tests.hf_reference import make_hf_model
    from tests.trainers.test_init_from import MATCHING

    _, src = make_hf_model(tmp_path, vocab=4096)
    sets = [
        s for s in MATCHING if not s.startswith(("train.steps", "data.seq_len", "optimizer.learning_rate"))
    ]
    r = _cli(
        "configs/sft_tiny.yaml",
        tmp_path / "w",
        *sets,
        f"checkpoint.init_from={src}",
        "train.steps=5",
        "data.seq_len=96",
        "train.eval_interval=5",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "initialised params from" in r.stdout


@pytest.mark.slow
def test_sft_starts_from_a_pretraining_workdir(tmp_path):
    """pretrain -> SFT chain (the README's): init_from a training workdir takes its newest
    checkpoint's params; the MTP layers tiny_moe trains and SFT switches off are left out."""
    small = ["model.num_layers=2", "data.seq_len=64", "train.eval_interval=100"]
    r = _cli("configs/tiny_moe.yaml", tmp_path / "pre", *small, "train.steps=2")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(
        "configs/sft_tiny.yaml",
        tmp_path / "sft",
        *small,
        "train.steps=2",
        f"checkpoint.init_from={tmp_path / 'pre'}",
    )
    assert r.returncode == 0 and "initialised params from" in r.stdout, r.stderr[-2000:]
    assert "tensors of the source this model does not have left out" in r.stdout
    r = _cli(
        "configs/sft_tiny.yaml",
        tmp_path / "mtp2",
        *small,
        "model.mtp_depth=2",
        "train.steps=2",
        f"checkpoint.init_from={tmp_path / 'pre'}",
    )
    assert r.returncode == 2 and "model.mtp_depth=1, but the config says 2" in r.stderr
    r = _cli(
        "configs/sft_tiny.yaml",
        tmp_path / "bad",
        *small,
        "model.hidden_size=64",
        "train.steps=2",
        f"checkpoint.init_from={tmp_path / 'pre'}",
    )
    assert r.returncode == 2 and "model.hidden_size=128, but the config says 64" in r.stderr


def _chat_set(tmp_path, n, bad_eval, eval_fraction):
    """n chats; the ones the split holds out for eval have no assistant reply when `bad_eval`."""
    from ernie_jax.data.text import _split_indices

    _, eval_idx = _split_indices(n, eval_fraction, load_config("configs/sft_tiny.yaml").train.seed)
    lines = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"question {i}"}]
        if not (bad_eval and i in set(eval_idx)):
            msgs.append({"role": "assistant", "content": f"answer {i}"})
        lines.append(json.dumps({"messages": msgs}))
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), len(eval_idx)


@pytest.mark.parametrize(
    "bad_eval, batch_size, fragment",
    [(True, 2, r"eval samples is usable \("), (False, 64, "fill no batch of data.batch_size=64 rows")],
)
def test_unusable_eval_split_is_refused_at_start_up(tmp_path, bad_eval, batch_size, fragment):
    from ernie_jax.errors import DataError
    from ernie_jax.trainers.sft import sft_task

    src, n_eval = _chat_set(tmp_path, 24, bad_eval, 0.2)
    assert 0 < n_eval < 24
    cfg = load_config(
        "configs/sft_tiny.yaml",
        [f"data.source={src}", "data.eval_fraction=0.2", f"data.batch_size={batch_size}"],
    )
    with pytest.raises(DataError, match=fragment) as e:
        sft_task(cfg)
    assert "data.eval_fraction=0" in str(e.value) and "\n" not in str(e.value)
    if bad_eval:
        assert "no reply" in str(e.value)
