"""2 local processes x 4 CPU devices (jax.distributed on 127.0.0.1) train like 1 process x 8 devices,
also as 2 simulated slices (a hybrid mesh, `mesh.dcn.*`)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

SETS = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "moe.intermediate_size=32",
    "data.seq_len=32",
    "data.batch_size=8",
    "log.interval=1",
    "train.eval_interval=100",
    "train.steps=3",
    "checkpoint.interval=3",
    "checkpoint.async_save=false",
    "mesh.data=2",
    "mesh.fsdp=4",
]


def _cmd(workdir, *extra):
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
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def _losses(workdir):
    return [r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "loss" in r]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env1 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    single = subprocess.run(_cmd(tmp_path / "one"), capture_output=True, text=True, timeout=600, env=env1)
    assert single.returncode == 0, single.stderr[-3000:]
    procs = _launch(tmp_path / "two", _port(), [], [subprocess.PIPE] * 2, stderr=subprocess.PIPE)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "processes: 2" in outs[0][0] and "loss" in outs[0][0]
    assert "devices:" not in outs[1][0] and "loss" not in outs[1][0]  # only process 0 reports
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "3")
    # 2 slices (one per process) x 4 devices: data across the slices, fsdp inside each
    procs = _launch(tmp_path / "dcn", _port(), ["--set", "mesh.dcn.data=2"], [subprocess.PIPE] * 2)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][0][-3000:]
    assert "dcn data=2" in outs[0][0]
    assert _losses(tmp_path / "dcn") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    # a split into more slices than the job has: one line, before any compute
    procs = _launch(tmp_path / "bad", _port(), ["--set", "mesh.dcn.fsdp=4"], [subprocess.PIPE] * 2)
    outs = [p.communicate(timeout=600) for p in procs]
    assert procs[0].returncode == 2 and "spans 4 slices but the job has 2 processes" in outs[0][0]


def _launch(workdir, port, extra, logs, stderr=subprocess.STDOUT):
    """The run as 2 local processes x 4 CPU devices; process i writes to logs[i]."""
    env4 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    return [
        subprocess.Popen(
            _cmd(
                workdir,
                "--coordinator_address",
                f"127.0.0.1:{port}",
                "--num_processes",
                "2",
                "--process_id",
                str(i),
            )
            + extra,
            stdout=logs[i],
            stderr=stderr,
            text=True,
            env=env4,
        )
        for i in range(2)
    ]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_on_one_host_stops_every_host_at_the_same_step(tmp_path):
    """A preempted VM gets SIGTERM alone: JAX's preemption service agrees on one step, every host
    saves it and exits cleanly (no host left hanging in a collective), and the run resumes there."""
    w = tmp_path / "w"
    extra = [
        a for s in ("train.steps=400", "checkpoint.interval=20", "checkpoint.keep=20") for a in ("--set", s)
    ]
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = _launch(w, _port(), extra, logs)
    deadline = time.time() + 300
    while not (w / "checkpoints" / "20").is_dir() and time.time() < deadline:
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    stopped = max(int(d) for d in os.listdir(w / "checkpoints") if d.isdigit())
    assert 20 < stopped < 400
    assert f"stopped by signal after step {stopped}" in (tmp_path / "p0.log").read_text()
    extra = [a for s in (f"train.steps={stopped + 2}", "checkpoint.interval=20") for a in ("--set", s)]
    logs = [open(tmp_path / f"r{i}.log", "w") for i in range(2)]
    procs = _launch(w, _port(), extra, logs)
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert f"at step {stopped}" in (tmp_path / "r0.log").read_text()
