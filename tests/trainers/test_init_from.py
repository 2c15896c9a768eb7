"""Training starts from converted Hugging Face weights (checkpoint.init_from)."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ernie_jax.config import load_config
from ernie_jax.convert import hf_to_ernie, load_pretrained
from ernie_jax.errors import CheckpointError
from ernie_jax.trainers.loop import run
from ernie_jax.trainers.pretrain import text_pretraining_task
from tests.hf_reference import make_hf_model

pytest.importorskip("transformers")

MATCHING = [
    "model.vocab_size=4096",
    "model.hidden_size=32",
    "model.num_layers=3",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=16",
    "model.intermediate_size=48",
    "model.mtp_depth=0",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.intermediate_size=24",
    "moe.num_shared_experts=1",
    "moe.bias_update_rate=0",
    "moe.orth_mode=loss",
    "optimizer.learning_rate=0",
    "train.steps=1",
    "data.seq_len=32",
    "data.batch_size=8",
    "train.eval_interval=100",
    "checkpoint.async_save=false",
]


@pytest.mark.parametrize("via", [pytest.param("orbax", marks=pytest.mark.slow), "hf"])
def test_init_from_converted_weights(tmp_path, via):
    _, src = make_hf_model(tmp_path, vocab=4096)
    init = src
    if via == "orbax":
        init = str(tmp_path / "converted")
        hf_to_ernie(src, init, dtype="float32", quiet=True)
    cfg = load_config("configs/tiny_moe.yaml", MATCHING + [f"checkpoint.init_from={init}"])
    run(cfg, str(tmp_path / "w"), text_pretraining_task, quiet=True)
    with ocp.StandardCheckpointer() as c:
        trained = c.restore(str(tmp_path / "w" / "checkpoints" / "1" / "state"))["params"]
    expected = nnx.to_pure_dict(nnx.split(load_pretrained(src), nnx.Param, ...)[1])
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)  # lr 0: the step changed nothing


def test_init_from_other_shape_is_refused(tmp_path):
    _, src = make_hf_model(tmp_path, vocab=4096)
    cfg = load_config(
        "configs/tiny_moe.yaml", MATCHING + ["model.hidden_size=64", f"checkpoint.init_from={src}"]
    )
    with pytest.raises(CheckpointError, match="model.hidden_size=32, but the config says 64"):
        run(cfg, str(tmp_path / "w"), text_pretraining_task, quiet=True)
