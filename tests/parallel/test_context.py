"""Context parallelism: the load-balanced order, and sharded == single device (fp32 losses and
grads) for context x data, context x expert x data (both transports), 3D positions, and with the
pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import load_config
from ernie_jax.errors import ConfigError
from ernie_jax.parallel.context import load_balanced_order
from ernie_jax.parallel.mesh import build_mesh
from ernie_jax.trainers.lm import lm_objective
from tests.parallel.sharded import model_state, place_batch, run

BATCH, SEQ = 8, 32
BASE = [
    "model.dtype=float32",
    "moe.dispatch=capacity",
    "moe.capacity_factor=4.0",
    f"data.batch_size={BATCH}",
    f"data.seq_len={SEQ}",
    "model.num_layers=2",
    "model.attention=flash",
    "model.attention_block_q=8",
    "model.attention_block_kv=8",
    "model.logits_chunk=4",
]


def test_load_balanced_order():
    order = load_balanced_order(16, 2)  # 4 chunks of 4: shard 0 holds chunks 0 and 3, shard 1 chunks 1 and 2
    assert order.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(load_balanced_order(48, 4).tolist()) == list(range(48))
    with pytest.raises(ConfigError, match="data.seq_len=12 is not divisible by 2 x mesh.context = 8"):
        load_balanced_order(12, 4)


def _batch(cfg, three_d=False):
    rng = np.random.default_rng(0)
    seq = cfg.data.seq_len
    ids = rng.integers(3, cfg.model.vocab_size, (BATCH, seq + 1)).astype(np.int32)
    seg = np.ones((BATCH, seq), np.int32)
    seg[1, 10:] = 2  # packed rows
    seg[3, 5:20] = 2
    seg[3, 20:] = 3
    seg[2, 25:] = 0  # padding
    batch = {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "segment_ids": seg,
        "loss_mask": (seg > 0).astype(np.float32),
    }
    if three_d:  # (t, h, w): a few "image" stretches where h and w differ from t
        pos = np.repeat(np.arange(seq)[None, :, None], 3, axis=2).repeat(BATCH, axis=0)
        pos[:, 8:12, 1] += np.array([0, 0, 1, 1])
        pos[:, 8:12, 2] += np.array([0, 1, 0, 1])
        batch["positions"] = pos.astype(np.int32)
    return batch


def _loss_and_grads(cfg, mesh, three_d=False):
    graphdef, params, rest = model_state(cfg, mesh)
    batch = _batch(cfg, three_d)
    placed = place_batch({k: v for k, v in batch.items() if k != "positions"}, mesh)
    if three_d:
        placed["positions"] = jnp.asarray(batch["positions"])

    def loss(params):
        out = nnx.merge(graphdef, params, rest).apply_batch(placed)
        return lm_objective(out, placed, cfg)[0]

    return run(jax.value_and_grad(loss), mesh, params)


def _assert_same(a, b, rtol=1e-5):
    (la, ga), (lb, gb) = a, b
    np.testing.assert_allclose(la, lb, rtol=rtol)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6)


def _compare(sharded_sets, three_d=False, base=(), reference_mesh=()):
    """`reference_mesh`: the reference runs on that mesh (e.g. the same pipeline without context)."""
    ref_cfg = load_config("configs/tiny_moe.yaml", BASE + list(base) + list(reference_mesh))
    ref = _loss_and_grads(ref_cfg, build_mesh(ref_cfg) if reference_mesh else None, three_d)
    cfg = load_config("configs/tiny_moe.yaml", BASE + list(base) + list(sharded_sets))
    _assert_same(_loss_and_grads(cfg, build_mesh(cfg), three_d), ref)


def test_context4_data2_equals_single_device():
    _compare(["mesh.context=4", "mesh.data=2"])


@pytest.mark.slow
def test_context_order_without_a_mesh_equals_natural_order():
    """mesh.context reorders the tokens even when no mesh is set: the model undoes it exactly."""
    ref = _loss_and_grads(load_config("configs/tiny_moe.yaml", BASE), None)
    _assert_same(_loss_and_grads(load_config("configs/tiny_moe.yaml", BASE + ["mesh.context=2"]), None), ref)


@pytest.mark.parametrize("transport", [pytest.param("auto", marks=pytest.mark.slow), "all_to_all"])
def test_context2_expert2_data2_equals_single_device(transport):
    _compare(["mesh.context=2", "mesh.expert=2", "mesh.data=2"], base=[f"moe.transport={transport}"])


@pytest.mark.slow
def test_3d_positions_under_context_parallelism():
    _compare(["mesh.context=2", "mesh.data=4"], three_d=True, base=["vision.rope_t_frequencies=4"])


@pytest.mark.slow
def test_context_with_pipeline_and_tensor():
    # the pipeline averages router losses over its microbatches: compare with the same pipeline
    pipe = ["mesh.pipeline=2", "model.num_layers=5"]
    _compare(["mesh.context=2", "mesh.data=2", *pipe], reference_mesh=["mesh.data=4", *pipe])
    _compare(["mesh.context=2", "mesh.tensor=2", "mesh.data=2"])


@pytest.mark.slow
def test_splash_kernel_per_shard_equals_flash():
    """The TPU path of context parallelism (keys back in natural order, one causal splash kernel
    per shard picked by lax.switch), run in Pallas interpret mode on 4 CPU devices."""
    splash = [
        "model.attention=splash",
        "model.attention_interpret=true",
        "model.attention_block_q=128",
        "model.attention_block_kv=128",
        "data.seq_len=512",
        "model.num_layers=2",
    ]
    cfg = load_config("configs/tiny_moe.yaml", BASE + splash + ["mesh.context=2", "mesh.data=4"])
    ref = _loss_and_grads(
        load_config("configs/tiny_moe.yaml", BASE + ["data.seq_len=512", "model.num_layers=2"]), None
    )
    _assert_same(_loss_and_grads(cfg, build_mesh(cfg)), ref, rtol=2e-5)
