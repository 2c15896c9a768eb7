"""2 local processes x 4 CPU devices (jax.distributed on 127.0.0.1) train like 1 process x 8 devices."""

import json
import os
import socket
import subprocess
import sys

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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env4 = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(
            _cmd(
                tmp_path / "two",
                "--coordinator_address",
                f"127.0.0.1:{port}",
                "--num_processes",
                "2",
                "--process_id",
                str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env4,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "processes: 2" in outs[0][0] and "loss" in outs[0][0]
    assert "devices:" not in outs[1][0] and "loss" not in outs[1][0]  # only process 0 reports
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "3")
