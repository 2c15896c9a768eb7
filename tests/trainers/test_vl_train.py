"""The VL model trains from the CLI on the embedded image-text set and resumes exactly."""

import json
import os
import shutil
import subprocess
import sys

SMALL = [
    "model.num_layers=2",
    "vision.depth=1",
    "data.seq_len=64",
    "data.batch_size=2",
    "data.max_patches=256",
    "log.interval=1",
    "checkpoint.async_save=false",
    "train.eval_interval=100",
    "train.eval_steps=1",
    "checkpoint.interval=2",
]


def _cli(workdir, *sets):
    cmd = [
        sys.executable,
        "-m",
        "ernie_jax.train",
        "--config",
        "configs/tiny_vl.yaml",
        "--workdir",
        str(workdir),
    ]
    for s in SMALL + list(sets):
        cmd += ["--set", s]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_vl_cli_trains_reports_and_resumes_exactly(tmp_path):
    full = _cli(tmp_path / "full", "train.steps=4")
    assert full.returncode == 0, full.stderr[-2000:]
    rows = _rows(tmp_path / "full")
    for key in (
        "lm_loss",
        "aux_loss",
        "vision_aux_loss",
        "vision_z_loss",
        "vision_orth_loss",
        "expert_load_cv",
        "vision_expert_load_cv",
    ):
        assert key in rows[-1], key
    assert "image-text" not in full.stderr and "samples" in full.stdout
    # resume from the step-2 checkpoint alone: steps 3 and 4 must repeat bit for bit
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "cut" / "checkpoints")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "4")
    second = _cli(tmp_path / "cut", "train.steps=4")
    assert second.returncode == 0 and "resumed" in second.stdout, second.stderr[-2000:]
    assert [r["loss"] for r in _rows(tmp_path / "cut")] == [r["loss"] for r in rows][2:]
