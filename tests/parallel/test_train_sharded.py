"""The CLI on a sharded mesh, and a checkpoint saved on 8 devices resumed on 4 with another layout."""

import json
import os
import subprocess
import sys

import pytest

SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "moe.intermediate_size=32",
    "data.seq_len=32",
    "data.batch_size=8",
    "log.interval=1",
    "train.eval_interval=100",
    "checkpoint.async_save=false",
    "checkpoint.interval=2",
]


def _cli(workdir, devices, *sets):
    cmd = [
        sys.executable,
        "-m",
        "ernie_jax.train",
        "--config",
        "configs/tiny_moe.yaml",
        "--workdir",
        str(workdir),
    ]
    for s in SMALL + list(sets):
        cmd += ["--set", s]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_resume_on_a_different_mesh(tmp_path):
    w = tmp_path / "w"
    r = _cli(w, 8, "train.steps=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh: data=2 x fsdp=2 x tensor=2" in r.stdout
    r = _cli(w, 4, "train.steps=4", "mesh.data=1", "mesh.expert=-1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout and "mesh: expert=4" in r.stdout
    rows = [json.loads(x) for x in open(w / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(r["loss"] < 20 for r in rows if "loss" in r)


@pytest.mark.slow
def test_pipelined_checkpoint_resumes_unpipelined(tmp_path):
    """Params stay in layer order whatever the schedule: a circular-pipeline checkpoint evaluates to the
    same loss on a plain data-parallel mesh."""
    w = tmp_path / "w"
    pipe = [
        "model.num_layers=5",
        "mesh.pipeline=2",
        "mesh.data=2",
        "mesh.expert=2",
        "pipeline.schedule=circular",
        "pipeline.repeats=2",
        "pipeline.microbatches=2",
    ]
    r = _cli(w, 8, "train.steps=2", "train.eval_interval=2", *pipe)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pipeline circular x2: 2 stages, 2 microbatches, 5 iterations, bubble 20.0%" in r.stdout
    r = _cli(w, 4, "train.steps=2", "train.eval_interval=2", "model.num_layers=5", "mesh.data=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    evals = [json.loads(x)["eval_loss"] for x in open(w / "metrics.jsonl") if "eval_loss" in x]
    assert len(evals) == 2 and abs(evals[0] - evals[1]) < 1e-5 * abs(evals[0]), evals


@pytest.mark.slow
def test_lora_trains_the_same_on_every_mesh(tmp_path):
    """Adapters and the frozen base take their shardings from the same logical-axis rules: data,
    fsdp x expert (all_to_all) and fsdp x tensor runs log the same losses."""
    lora = [
        "lora.enabled=true",
        "train.steps=3",
        "model.mtp_depth=0",
        "moe.capacity_factor=8",
        "optimizer.learning_rate=1e-2",
    ]
    losses = []
    for i, mesh in enumerate(
        (
            ["mesh.data=-1"],
            ["mesh.fsdp=2", "mesh.expert=2", "mesh.data=2", "moe.transport=all_to_all"],
            ["mesh.fsdp=4", "mesh.tensor=2"],
        )
    ):
        r = _cli(tmp_path / str(i), 8, *lora, *mesh)
        assert r.returncode == 0, r.stderr[-3000:]
        losses.append(
            [x["loss"] for x in map(json.loads, open(tmp_path / str(i) / "metrics.jsonl")) if "loss" in x]
        )
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], rel=1e-5)
