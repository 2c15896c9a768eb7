"""End to end on CPU: the training CLI, exact resume, SIGTERM, damaged checkpoints, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "moe.intermediate_size=32",
    "data.seq_len=32",
    "data.batch_size=4",
    "train.eval_steps=2",
    "log.interval=1",
    "checkpoint.async_save=false",
]


def _cli(workdir, *sets, wait=True, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "ernie_jax.train",
        "--config",
        "configs/tiny_moe.yaml",
        "--workdir",
        str(workdir),
        *extra,
    ]
    for s in SMALL + list(sets):
        cmd += ["--set", s]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in _metrics(workdir) if "loss" in r}


def test_cli_trains_and_reports(tmp_path):
    # also train.profile_steps (a jax.profiler trace of steps 2-3) and train.compile_cache
    r = _cli(
        tmp_path / "w",
        "train.steps=4",
        "train.eval_interval=2",
        "checkpoint.interval=2",
        "train.profile_steps=[2,3]",
        f"train.compile_cache={tmp_path / 'cache'}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "profile of steps 2-3 written to" in r.stdout
    traces = [f for _, _, files in os.walk(tmp_path / "w" / "profile") for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    assert any(f.startswith("jit_step") for f in os.listdir(tmp_path / "cache"))
    assert "devices:" in r.stdout and "active" in r.stdout and "MFU" in r.stdout and "eval @ 4" in r.stdout
    rows = _metrics(tmp_path / "w")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in (
        "lm_loss",
        "aux_loss",
        "z_loss",
        "orth_loss",
        "mtp_loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "mfu",
        "expert_load_min",
        "expert_load_max",
        "expert_load_cv",
        "dropped_fraction",
    ):
        assert key in train_rows[-1], key
    assert len(train_rows[-1]["expert_load_cv"]) == 1  # one MoE layer
    assert any("eval_ppl" in r for r in rows)
    assert os.listdir(tmp_path / "w" / "tb")
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["2", "4"]


def test_exact_resume_after_sigterm_mid_accumulation(tmp_path):
    sets = [
        "train.steps=8",
        "optimizer.grad_accum_steps=2",
        "checkpoint.interval=100",
        "train.eval_interval=100",
    ]
    ref = _cli(tmp_path / "ref", *sets)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = _cli(tmp_path / "cut", *sets, "train.steps=8", wait=False)
    deadline = time.time() + 300
    metrics = tmp_path / "cut" / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by signal" in out
    saved = sorted(int(s) for s in os.listdir(tmp_path / "cut" / "checkpoints") if s.isdigit())
    assert saved and saved[-1] < 8, saved
    again = _cli(tmp_path / "cut", *sets)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "ref")  # bitwise, every step


def test_damaged_checkpoint_is_never_loaded(tmp_path):
    w = tmp_path / "w"
    assert _cli(w, "train.steps=4", "checkpoint.interval=2", "train.eval_interval=100").returncode == 0
    ckpts = w / "checkpoints"
    # a newest step whose array data was lost in a crash, and a leftover orbax temp dir
    shutil.rmtree(ckpts / "4" / "state")
    (ckpts / "4" / "state").mkdir()
    (ckpts / "6.orbax-checkpoint-tmp-123").mkdir()
    r = _cli(w, "train.steps=6", "checkpoint.interval=2", "train.eval_interval=100")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    names = os.listdir(ckpts)
    assert any(n.startswith("4.damaged-") for n in names)  # kept for inspection, not deleted
    assert "6" in names
    steps = [row["step"] for row in _metrics(w) if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 3-4 of the first run, past the restored step, once
    assert [json.loads(ln)["step"] for ln in open(w / "metrics.superseded.jsonl")] == [
        3,
        4,
        4,
    ]  # train and eval rows


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["data.source=/nonexistent/corpus.txt"], "data.source: /nonexistent/corpus.txt matches no file"),
        (["model.vocab_size=1000"], "tokenizer has 4096 tokens but model.vocab_size=1000"),
        (["data.tokenizer=/nonexistent"], "no tokenizer.model or tokenizer.json"),
        (["model.attention=flashy"], "model.attention='flashy' is not allowed"),
        (["model.attention=splash"], "model.attention=splash needs a TPU but this run is on cpu"),
        (["model.attention=cudnn"], "model.attention=cudnn needs a GPU but this run is on cpu"),
        (["mesh.context=3"], "data.seq_len=32 is not divisible by 2 x mesh.context = 6"),
        (["stages=[{name: a/../../x, steps: 1}]"], "name 'a/../../x' must be a plain identifier"),
        (["train.max_skipped_steps=0"], "train.max_skipped_steps=0 must be >= 1"),
        (
            ["data.eval_source=[/nonexistent/val.txt]"],
            "data.eval_source val=/nonexistent/val.txt: no such file",
        ),
        (["data.eval_source=[a=x.txt, a=y.txt]"], "data.eval_source names must be unique"),
        (
            ["log.sample_prompts=[In the]", "log.sample_max_new_tokens=5000"],
            "exceeds model.max_position_embeddings",
        ),
    ],
)
def test_bad_input_one_line_before_compute(tmp_path, sets, fragment):
    r = _cli(tmp_path / "w", "train.steps=2", *sets)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1


def test_out_of_memory_is_one_line_before_the_first_step(tmp_path):
    """A step XLA says cannot fit (dense attention's S x S logits at 64K tokens) is refused after
    compiling, before it runs, with the settings that would fix it."""
    r = _cli(
        tmp_path / "w",
        "train.steps=2",
        "model.attention=dense",
        "data.seq_len=65536",
        "data.batch_size=1",
        "model.max_position_embeddings=65536",
        "model.mtp_depth=0",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    assert "out of memory: the compiled train step needs" in errors[0]
    for fix in ("data.seq_len=65536", "model.attention=flash", "model.remat=full", "mesh.context"):
        assert fix in errors[0]
    assert not os.path.isdir(tmp_path / "w" / "checkpoints") or not os.listdir(tmp_path / "w" / "checkpoints")


def test_empty_corpus_and_unwritable_workdir(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n\n")
    r = _cli(tmp_path / "w", f"data.source={empty}")
    assert r.returncode == 2 and "holds no usable document" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _cli(blocker / "sub", "train.steps=1")
    assert r.returncode == 2 and "is not writable" in r.stderr


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    w = tmp_path / "w"
    assert _cli(w, "train.steps=2", "checkpoint.interval=2", "train.eval_interval=100").returncode == 0
    before = sorted(os.listdir(w / "checkpoints"))
    r = _cli(w, "train.steps=4", "model.hidden_size=96")
    assert r.returncode == 2 and "model.hidden_size=64, but the config says 96" in r.stderr
    assert sorted(os.listdir(w / "checkpoints")) == before


def test_diverging_run_skips_steps_and_stops_with_one_line(tmp_path):
    """learning rate 1e9: the loss goes non-finite; those updates are skipped and counted, no
    checkpoint holds non-finite params, and a run of max_skipped_steps stops with one line."""
    r = _cli(
        tmp_path / "w",
        "train.steps=30",
        "optimizer.learning_rate=1e9",
        "optimizer.warmup_steps=0",
        "train.max_skipped_steps=4",
        "checkpoint.interval=2",
        "train.eval_interval=100",
        "model.mtp_depth=0",
    )
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "not finite for 4 steps in a row" in errors[0] and "Traceback" not in r.stderr
    rows = [row for row in _metrics(tmp_path / "w") if "skipped_steps" in row]
    assert sum(row["skipped_steps"] for row in rows) >= 4
    assert all(np.isfinite(row["loss"]) for row in rows if "loss" in row)
    from ernie_jax.checkpoint.manager import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "w" / "checkpoints"), keep=10, async_save=False)
    assert ckpt.steps() and max(ckpt.steps()) < 30
    import orbax.checkpoint as ocp

    for step in ckpt.steps():
        params = ckpt._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"][
            "params"
        ]
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), step


def test_second_run_into_a_busy_workdir_refuses_and_a_dead_holder_does_not_block(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ernie_jax.checkpoint.lock import "
            "WorkdirLock\nwith WorkdirLock(sys.argv[1]):\n"
            " print('held', flush=True); time.sleep(600)",
            str(w),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        r = _cli(w, "train.steps=1")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and f"in use by another run (process {holder.pid} on" in err[0], r.stderr[-1000:]
        assert not (w / "metrics.jsonl").exists() and not (w / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    from ernie_jax.checkpoint.lock import WorkdirLock

    with WorkdirLock(str(w)):  # the killed holder's lock went with it
        pass


@pytest.mark.slow
def test_garbage_saved_config_is_set_aside_and_all_damaged_is_one_warning(tmp_path):
    w = tmp_path / "w"
    sets = ["checkpoint.interval=2", "train.eval_interval=100"]
    assert _cli(w, "train.steps=4", *sets).returncode == 0
    ckpts = w / "checkpoints"
    (ckpts / "4" / "config" / "metadata").write_bytes(os.urandom(300))
    r = _cli(w, "train.steps=6", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at step 2" in r.stdout and any(n.startswith("4.damaged-") for n in os.listdir(ckpts))
    for step in ("2", "4", "6"):
        (ckpts / step / "config" / "metadata").write_text("{not json")
    r = _cli(w, "train.steps=2", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("is damaged") == 1 and "starting from scratch" in r.stdout
    assert sorted(n for n in os.listdir(ckpts) if "damaged" not in n) == ["2"]


def test_bytes_damaged_in_place_are_caught_by_checksums(tmp_path):
    """4 KiB of random bytes inside the newest step's largest state file (size unchanged): the
    step is set aside and the run resumes from the one before."""
    w = tmp_path / "w"
    assert _cli(w, "train.steps=4", "checkpoint.interval=2", "train.eval_interval=100").returncode == 0
    ckpts = w / "checkpoints"
    assert (ckpts / "2" / "checksums.json").exists() and (ckpts / "4" / "checksums.json").exists()
    files = [p for p in (ckpts / "4" / "state").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    size = target.stat().st_size
    with open(target, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(min(4096, size // 2)))
    assert target.stat().st_size == size
    r = _cli(w, "train.steps=6", "checkpoint.interval=2", "train.eval_interval=100")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "at step 2" in r.stdout and any(n.startswith("4.damaged-") for n in os.listdir(ckpts))
    assert all(np.isfinite(v) for v in _losses(w).values())
