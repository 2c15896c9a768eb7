"""Three-stage pretraining: one command runs every stage, carries params forward, initialises the
vision parts in stage III, never changes frozen params, logs the stage, and resumes when killed at
a stage boundary or inside a stage with the same results."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

SMALL = {
    "model": {"num_layers": 2},
    "vision": {"depth": 1},
    "data": {"batch_size": 2, "max_patches": 256},
    "train": {"eval_steps": 1},
    "checkpoint": {"async_save": False, "interval": 2},
    "log": {"interval": 1, "tensorboard": False},
}
STEPS = {"I_text": 4, "II_long_text": 2, "IIIa_vit_adapter": 2, "IIIb_vision_experts": 2, "IIIc_joint": 3}


def _write_cfg(tmp_path) -> str:
    """The shipped recipe with few steps per stage (stage lists replace, they do not merge)."""
    base = os.path.abspath("configs/pretrain_3stage_tiny.yaml")
    with open(base) as f:
        stages = yaml.safe_load(f)["stages"]
    for st in stages:
        st["steps"] = STEPS[st["name"]]
        st["set"] = [
            x if "seq_len=8192" not in x else "data.seq_len=512" for x in st["set"] if "batch_size" not in x
        ]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"base": base, **SMALL, "stages": stages}))
    return str(path)


def _cli(config, workdir):
    r = subprocess.run(
        [sys.executable, "-m", "ernie_jax.train", "--config", config, "--workdir", workdir],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _params(workdir, stage_dir, step):
    with ocp.StandardCheckpointer() as c:
        return c.restore(os.path.join(workdir, stage_dir, "checkpoints", str(step), "state"))["params"]


def _lm(params):
    return {
        k: v
        for k, v in jax.tree_util.tree_leaves_with_path(params)
        if not any(
            n in jax.tree_util.keystr(k)
            for n in ("vision_model", "resampler", "vision_gate", "vision_experts")
        )
    }


@pytest.mark.slow
def test_three_stages_end_to_end(tmp_path):
    cfg = _write_cfg(tmp_path)
    w = str(tmp_path / "run")
    out = _cli(cfg, w).stdout
    assert "stage IIIc_joint" in out and "text val loss" in out
    summary = {r["stage"]: r for r in json.load(open(os.path.join(w, "stages.json")))}
    assert "text_eval_loss" in summary["II_long_text"] and "text_eval_loss" in summary["IIIc_joint"]
    metrics = [json.loads(x) for x in open(os.path.join(w, "metrics.jsonl"))]
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, sum(STEPS.values()) + 1))
    assert [m["stage"] for m in train] == [s for s, n in STEPS.items() for _ in range(n)]

    # stage II -> IIIa: the language model is frozen, so it leaves stage IIIa bit for bit unchanged;
    # the vision parts exist only from stage III on
    p2, p3a = _params(w, "2_II_long_text", 2), _params(w, "3_IIIa_vit_adapter", 2)
    assert "vision_model" not in p2 and "vision_model" in p3a
    lm2, lm3 = _lm(p2), _lm(p3a)
    assert lm2.keys() == lm3.keys()
    for k in lm2:
        np.testing.assert_array_equal(lm2[k], lm3[k], err_msg=jax.tree_util.keystr(k))
    # IIIb freezes the ViT: identical to IIIa's
    p3b = _params(w, "4_IIIb_vision_experts", 2)
    for a, b in zip(jax.tree.leaves(p3a["vision_model"]), jax.tree.leaves(p3b["vision_model"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_three_stages_resume_at_a_boundary_and_inside_a_stage(tmp_path):
    cfg = _write_cfg(tmp_path)
    w = str(tmp_path / "run")
    _cli(cfg, w)
    final = _params(w, "5_IIIc_joint", 3)

    # killed right at the IIIa/IIIb boundary: IIIb and IIIc rerun from IIIa's final params
    w2 = str(tmp_path / "boundary")
    shutil.copytree(w, w2)
    for d in ("4_IIIb_vision_experts", "5_IIIc_joint"):
        shutil.rmtree(os.path.join(w2, d))
    with open(os.path.join(w2, "stages.json"), "w") as f:
        json.dump(
            [
                r
                for r in json.load(open(os.path.join(w, "stages.json")))
                if r["stage"] not in ("IIIb_vision_experts", "IIIc_joint")
            ],
            f,
        )
    _cli(cfg, w2)
    # killed inside IIIc (after its step-2 checkpoint): resumes there
    w3 = str(tmp_path / "inside")
    shutil.copytree(w, w3)
    shutil.rmtree(os.path.join(w3, "5_IIIc_joint", "checkpoints", "3"))
    with open(os.path.join(w3, "stages.json"), "w") as f:
        json.dump(
            [r for r in json.load(open(os.path.join(w, "stages.json"))) if r["stage"] != "IIIc_joint"], f
        )
    _cli(cfg, w3)
    for other in (w2, w3):
        again = _params(other, "5_IIIc_joint", 3)
        for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again)):
            np.testing.assert_array_equal(a, b)
