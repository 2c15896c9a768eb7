"""The metrics writers: JSONL rows, TensorBoard, and the optional Weights & Biases run (a stand-in
`wandb` module records the calls; nothing leaves the machine)."""

import json
import sys
import types

import pytest

from ernie_jax.config import LogConfig
from ernie_jax.errors import ConfigError
from ernie_jax.metrics import WANDB_ID_FILE, MetricsWriter


class FakeRun:
    def __init__(self, calls, kwargs):
        self.calls = calls
        calls.append(("init", kwargs))

    def log(self, scalars, step):
        self.calls.append(("log", step, scalars))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.SimpleNamespace(init=lambda **kw: FakeRun(calls, kw))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_run_gets_config_scalars_and_is_resumed_by_id(tmp_path, fake_wandb):
    log = LogConfig(tensorboard=False, wandb_project="ernie", wandb_entity="lab")
    w = MetricsWriter(str(tmp_path), log, config={"train": {"steps": 4}}, run_name="exp1")
    w.write(2, {"loss": 3.5, "expert_load_cv": [0.1, 0.2], "stage": "text"})
    w.close()
    init = fake_wandb[0][1]
    run_id = (tmp_path / WANDB_ID_FILE).read_text()
    assert (init["project"], init["entity"], init["name"], init["id"]) == ("ernie", "lab", "exp1", run_id)
    assert init["config"] == {"train": {"steps": 4}} and init["resume"] == "allow"
    assert fake_wandb[1] == (
        "log",
        2,
        {"loss": 3.5, "expert_load_cv/layer0": 0.1, "expert_load_cv/layer1": 0.2},
    )
    assert fake_wandb[2] == ("finish",)
    # a resumed run (same workdir) continues the same W&B run; rows after the resume point move aside
    w = MetricsWriter(str(tmp_path), log, resume_step=1, config={}, run_name="exp1")
    w.close()
    assert fake_wandb[3][1]["id"] == run_id
    assert not (tmp_path / "metrics.jsonl").read_text()
    assert json.loads((tmp_path / "metrics.superseded.jsonl").read_text())["step"] == 2


def test_wandb_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match=r"log.wandb_project='ernie' needs the wandb package: pip install"):
        MetricsWriter(str(tmp_path), LogConfig(tensorboard=False, wandb_project="ernie"))


def test_resolved_config_goes_to_tensorboard(tmp_path):
    w = MetricsWriter(str(tmp_path), LogConfig(), config={"model": {"hidden_size": 64}})
    w.write(1, {"loss": 1.0})
    w.close()
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb").iterdir())
    assert b"hidden_size" in events
