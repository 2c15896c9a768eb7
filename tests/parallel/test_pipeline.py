"""Pipeline parallelism: the GPipe and circular schedules equal the unpipelined model (loss and
grads, fp32) on one device and sharded over 4 and 8 CPU devices with data and expert axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import load_config
from ernie_jax.errors import ConfigError
from ernie_jax.model.ernie import ModelOutput
from ernie_jax.parallel.mesh import build_mesh
from ernie_jax.parallel.pipeline import Schedule, from_microbatches, schedule_for, to_microbatches
from ernie_jax.trainers.lm import lm_objective
from tests.parallel.sharded import model_state, place_batch, run

BATCH, SEQ = 8, 16
BASE = ["model.dtype=float32", "moe.dispatch=capacity", "moe.capacity_factor=4.0", f"data.batch_size={BATCH}"]


def _batch(cfg):
    ids = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    seg = np.ones((BATCH, SEQ), np.int32)
    seg[1, 10:] = 2  # a packed row
    seg[2, 12:] = 0  # padding
    return {
        "input_ids": ids[:, :-1],
        "labels": ids[:, 1:],
        "segment_ids": seg,
        "loss_mask": (seg > 0).astype(np.float32),
        "modality": (ids[:, :-1] % 3 == 0).astype(np.int32),
    }  # used by heterogeneous (VL) layers


def _reference(cfg, microbatches):
    """Unpipelined model on each microbatch (rows i, i+M, ...): router losses averaged, LM loss over
    the whole batch -- what the pipeline computes."""
    graphdef, params, rest = model_state(cfg)
    batch = _batch(cfg)

    def loss(params):
        model = nnx.merge(graphdef, params, rest)
        ids, seg, mod = (
            to_microbatches(jnp.asarray(batch[k]), microbatches)
            for k in ("input_ids", "segment_ids", "modality")
        )
        outs = [model(ids[i], segment_ids=seg[i], modality=mod[i]) for i in range(microbatches)]
        stack = lambda f: from_microbatches(jnp.stack([f(o) for o in outs]))
        mtp = None
        if outs[0].mtp_logits is not None:
            mtp = stack(lambda o: o.mtp_logits.swapaxes(0, 1)).swapaxes(0, 1)
        losses = {k: sum(o.router_losses[k] for o in outs) / microbatches for k in outs[0].router_losses}
        out = ModelOutput(logits=stack(lambda o: o.logits), router_losses=losses, mtp_logits=mtp)
        return lm_objective(out, batch, cfg)[0]

    return jax.jit(jax.value_and_grad(loss))(params)


def _pipelined(cfg, mesh=None):
    graphdef, params, rest = model_state(cfg, mesh)
    batch = place_batch(_batch(cfg), mesh)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(
            batch["input_ids"], segment_ids=batch["segment_ids"], modality=batch["modality"]
        )
        return lm_objective(out, batch, cfg)[0]

    return run(jax.value_and_grad(loss), mesh, params)


def _assert_close(got, want):
    (loss, grads), (ref_loss, ref_grads) = got, want
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_schedule_bubble():
    assert Schedule(4, 8, 1).iterations == 11
    assert Schedule(4, 8, 1).bubble_fraction == pytest.approx(3 / 11)
    assert Schedule(4, 8, 2).bubble_fraction == pytest.approx(3 / 19)  # circular: R x smaller bubble share
    # interleaved 1f1b: forwards and backwards each R*M + S - 1 ticks of the R*(M + S) + S - 2
    assert Schedule(4, 8, 2, "1f1b").iterations == 2 * 12 + 2 and Schedule(4, 8, 1, "1f1b").iterations == 14
    assert "interleaved 1f1b x2" in Schedule(4, 8, 2, "1f1b").describe()
    cfg = load_config("configs/tiny_moe.yaml", ["model.num_layers=5", "mesh.pipeline=2", "mesh.data=1"])
    assert schedule_for(cfg) == Schedule(2, 2, 1)
    assert "bubble 33.3%" in schedule_for(cfg).describe()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["mesh.pipeline=4"],
            "the 3 pipelined MoE units are fewer than mesh.pipeline x pipeline.repeats = 4 x 1",
        ),
        (["model.num_layers=5", "mesh.pipeline=2", "pipeline.repeats=2"], "schedule=circular or 1f1b"),
        (
            [
                "model.num_layers=5",
                "mesh.pipeline=2",
                "pipeline.schedule=circular",
                "pipeline.repeats=2",
                "pipeline.microbatches=1",
            ],
            "must be >= mesh.pipeline=2 for the circular schedule",
        ),
        (
            ["model.num_layers=5", "mesh.pipeline=2", "pipeline.microbatches=3"],
            "not divisible by pipeline.microbatches=3",
        ),
        (["mesh.pipeline=-1"], "give the number of pipeline stages explicitly"),
    ],
)
def test_bad_pipeline_config(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config("configs/tiny_moe.yaml", BASE + overrides)


slow = pytest.mark.slow


@pytest.mark.parametrize(
    "layers, pipe",
    [
        pytest.param(5, ["mesh.pipeline=2", "pipeline.microbatches=4"], marks=slow),
        pytest.param(
            5,
            [
                "mesh.pipeline=2",
                "pipeline.schedule=circular",
                "pipeline.repeats=2",
                "pipeline.microbatches=4",
            ],
            marks=slow,
        ),
        pytest.param(
            7,
            [
                "mesh.pipeline=2",
                "pipeline.schedule=circular",
                "pipeline.repeats=3",
                "pipeline.microbatches=2",
            ],
            marks=slow,
        ),
        # uneven stages: 3 MoE units on 2 stages (like 27 units of 21B-A3B on 4), padded with a pass-through
        (4, ["mesh.pipeline=2", "pipeline.microbatches=2"]),
        pytest.param(
            6,
            [
                "mesh.pipeline=2",
                "pipeline.schedule=circular",
                "pipeline.repeats=2",
                "pipeline.microbatches=2",
            ],
            marks=slow,
        ),  # 5 units in 4 chunks of 2
    ],
)
def test_schedule_on_one_device_equals_unpipelined(layers, pipe):
    cfg = load_config("configs/tiny_moe.yaml", BASE + [f"model.num_layers={layers}"] + pipe)
    ref = _reference(
        load_config("configs/tiny_moe.yaml", BASE + [f"model.num_layers={layers}"]),
        schedule_for(cfg).microbatches,
    )
    _assert_close(_pipelined(cfg), ref)


needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


@needs8
@pytest.mark.parametrize(
    "config, layers, layout",
    [
        # 4 devices
        pytest.param(
            "tiny_moe", 5, ["mesh.pipeline=4", "mesh.data=1", "pipeline.microbatches=4"], marks=slow
        ),
        (
            "tiny_moe",
            5,
            [
                "mesh.pipeline=2",
                "mesh.data=2",
                "pipeline.schedule=circular",
                "pipeline.repeats=2",
                "pipeline.microbatches=2",
            ],
        ),
        ("tiny_dense", 4, ["mesh.pipeline=2", "mesh.expert=1", "mesh.data=2", "pipeline.microbatches=2"]),
        # 8 devices (with tensor: MTP's concatenated input once met an XLA partitioner bug here)
        pytest.param(
            "tiny_moe",
            5,
            ["mesh.pipeline=2", "mesh.data=2", "mesh.tensor=2", "pipeline.microbatches=2"],
            marks=slow,
        ),
        # uneven: 3 units over 2 stages; the stack is stored FSDP-split over `pipeline` and regrouped
        pytest.param(
            "tiny_moe",
            4,
            ["mesh.pipeline=2", "mesh.data=2", "mesh.expert=2", "pipeline.microbatches=2"],
            marks=slow,
        ),
        pytest.param(
            "tiny_moe",
            5,
            ["mesh.pipeline=2", "mesh.data=2", "mesh.expert=2", "pipeline.microbatches=2"],
            marks=slow,
        ),
        pytest.param(
            "tiny_moe",
            9,
            [
                "mesh.pipeline=2",
                "mesh.data=1",
                "mesh.expert=4",
                "pipeline.schedule=circular",
                "pipeline.repeats=2",
                "pipeline.microbatches=2",
                "moe.transport=all_to_all",
            ],
            marks=slow,
        ),
        pytest.param(
            "tiny_moe", 5, ["mesh.pipeline=4", "mesh.data=2", "pipeline.microbatches=4"], marks=slow
        ),
        pytest.param(
            "tiny_moe",
            5,
            [
                "mesh.pipeline=2",
                "mesh.fsdp=2",
                "mesh.expert=2",
                "mesh.data=1",
                "pipeline.schedule=circular",
                "pipeline.repeats=2",
                "pipeline.microbatches=2",
                "moe.transport=allgather",
            ],
            marks=slow,
        ),
    ],
)
def test_sharded_pipeline_equals_unpipelined(config, layers, layout):
    base = BASE + [f"model.num_layers={layers}"]
    cfg = load_config(f"configs/{config}.yaml", base + layout)
    mesh = build_mesh(cfg, jax.devices()[: _devices(cfg)])
    ref = _reference(load_config(f"configs/{config}.yaml", base), schedule_for(cfg).microbatches)
    _assert_close(_pipelined(cfg, mesh), ref)


@needs8
def test_heterogeneous_layers_pipelined():
    """Text and vision expert groups inside the stages, expert-parallel, circular schedule."""
    base = BASE + ["model.num_layers=5", "moe.vision_num_experts=8", "moe.vision_intermediate_size=64"]
    cfg = load_config(
        "configs/tiny_moe.yaml",
        base
        + [
            "mesh.pipeline=2",
            "mesh.data=2",
            "mesh.expert=2",
            "pipeline.schedule=circular",
            "pipeline.repeats=2",
            "pipeline.microbatches=2",
            "moe.transport=all_to_all",
        ],
    )
    ref = _reference(load_config("configs/tiny_moe.yaml", base), 2)
    _assert_close(_pipelined(cfg, build_mesh(cfg)), ref)


def _devices(cfg):
    m = cfg.mesh
    return m.pipeline * max(m.data, 1) * m.fsdp * m.tensor * m.expert
