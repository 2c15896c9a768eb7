"""Exact resume when the stop lands between the micro-batches of one gradient-accumulation cycle."""

import json
import os
import signal

import pytest

from ernie_jax.config import load_config
from ernie_jax.trainers.loop import run
from ernie_jax.trainers.pretrain import text_pretraining_task

SETS = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "moe.intermediate_size=32",
    "data.seq_len=32",
    "data.batch_size=8",
    "optimizer.grad_accum_steps=2",
    "train.steps=6",
    "log.interval=1",
    "checkpoint.interval=100",
    "train.eval_interval=100",
    "checkpoint.async_save=false",
]


class _SigtermOnFetch:
    """Forwards a grain iterator; sends SIGTERM to this process on the n-th micro-batch fetch."""

    def __init__(self, it, n):
        self.it, self.n, self.calls = it, n, 0

    def __next__(self):
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, s):
        self.it.set_state(s)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "loss" in r}


@pytest.mark.slow
def test_stop_between_microbatches_resumes_bitwise(tmp_path):
    cfg = load_config("configs/tiny_moe.yaml", SETS)
    run(cfg, str(tmp_path / "ref"), text_pretraining_task, quiet=True)

    def interrupted(c):
        task = text_pretraining_task(c)
        task.train_iter = _SigtermOnFetch(task.train_iter, n=6)  # 2nd micro-batch of step 3
        return task

    cut = str(tmp_path / "cut")
    run(cfg, cut, interrupted, quiet=True)
    assert os.listdir(os.path.join(cut, "checkpoints")) == ["3"]
    assert sorted(_losses(cut)) == [1, 2, 3]
    run(cfg, cut, text_pretraining_task, quiet=True)
    assert _losses(cut) == _losses(str(tmp_path / "ref"))
