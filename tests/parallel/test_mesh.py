"""Mesh construction, the rules table, and sharded == single-device numerics on 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ernie_jax.config import load_config
from ernie_jax.errors import ConfigError
from ernie_jax.model import build_model
from ernie_jax.parallel.mesh import (
    batch_sharding,
    build_mesh,
    device_grid,
    logical_to_spec,
    mesh_shape,
    state_shardings,
)
from ernie_jax.trainers.lm import lm_objective
from tests.parallel.sharded import model_state, place_batch, run

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")


def test_mesh_shape_and_errors():
    cfg = load_config("configs/tiny_moe.yaml", ["mesh.fsdp=2", "mesh.expert=2"])
    assert mesh_shape(cfg.mesh, 8) == {
        "data": 2,
        "fsdp": 2,
        "context": 1,
        "tensor": 1,
        "expert": 2,
        "pipeline": 1,
    }
    with pytest.raises(ConfigError, match="uses 6 devices but 8 are available"):
        mesh_shape(load_config("configs/tiny_moe.yaml", ["mesh.data=3", "mesh.fsdp=2"]).mesh, 8)
    with pytest.raises(ConfigError, match="only one axis may be -1"):
        mesh_shape(load_config("configs/tiny_moe.yaml", ["mesh.fsdp=-1"]).mesh, 8)
    with pytest.raises(ConfigError, match="moe.num_experts=8 is not divisible by mesh.expert=3"):
        build_mesh(load_config("configs/tiny_moe.yaml", ["mesh.data=1", "mesh.expert=3"]), jax.devices()[:3])


def test_rules_table():
    mesh = build_mesh(
        load_config("configs/tiny_moe.yaml", ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"])
    )
    assert logical_to_spec(("exp", "embed", "mlp"), (3, 8, 64, 32), mesh) == P(
        None, "expert", "fsdp", "tensor"
    )
    assert logical_to_spec(("embed", "mlp"), (64, 3), mesh) == P("fsdp", None)  # 3 not divisible: replicated
    assert logical_to_spec(("norm",), (64,), mesh) == P(None)
    assert batch_sharding(mesh, 3, 1).spec == P(None, ("fsdp", "expert"), None)


def _loss_and_grads(cfg, mesh=None):
    graphdef, params, rest = model_state(cfg, mesh)
    ids = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (8, 33)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((8, 32), np.float32)}
    if cfg.moe.vision_num_experts:  # heterogeneous layers: about a third of the tokens are vision tokens
        batch["modality"] = (ids[:, :-1] % 3 == 0).astype(np.int32)
    batch = place_batch(batch, mesh)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(batch["input_ids"], modality=batch.get("modality"))
        return lm_objective(out, batch, cfg)[0]

    return run(jax.value_and_grad(loss), mesh, params)


@pytest.mark.parametrize(
    "layout, dispatch",
    [
        (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], "capacity"),
        (["mesh.data=2", "mesh.expert=4"], "capacity"),
        (["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4"], "capacity"),
        (["mesh.data=2", "mesh.expert=4"], "dropless"),
        (["mesh.data=2", "mesh.expert=4", "moe.transport=all_to_all"], "capacity"),
        (["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", "moe.transport=all_to_all"], "capacity"),
        (["mesh.data=2", "mesh.expert=4", "moe.transport=allgather"], "capacity"),
        (["mesh.data=1", "mesh.expert=8", "moe.transport=allgather"], "capacity"),
    ],
)
def test_sharded_loss_and_grads_equal_single_device(layout, dispatch):
    base = [
        "model.num_layers=3",
        "model.dtype=float32",
        f"moe.dispatch={dispatch}",
        "moe.capacity_factor=4.0",
    ]
    cfg = load_config("configs/tiny_moe.yaml", base + layout)
    ref_loss, ref_grads = _loss_and_grads(load_config("configs/tiny_moe.yaml", base), None)
    loss, grads = _loss_and_grads(cfg, build_mesh(cfg))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize(
    "layout",
    [
        ["mesh.data=2", "mesh.expert=4", "moe.transport=all_to_all"],
        ["mesh.data=2", "mesh.expert=4", "moe.transport=allgather"],
        ["mesh.data=2", "mesh.expert=4"],
    ],
)
def test_heterogeneous_layer_sharded_equals_single_device(layout):
    """Text and vision expert groups, each expert-parallel, match the single-device run."""
    base = [
        "model.num_layers=3",
        "model.dtype=float32",
        "moe.dispatch=capacity",
        "moe.capacity_factor=4.0",
        "moe.vision_num_experts=8",
        "moe.vision_intermediate_size=64",
    ]
    ref_loss, ref_grads = _loss_and_grads(load_config("configs/tiny_moe.yaml", base), None)
    cfg = load_config("configs/tiny_moe.yaml", base + layout)
    loss, grads = _loss_and_grads(cfg, build_mesh(cfg))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def _fp8_loss_and_grads(cfg, mesh, seed_history):
    """Loss, param grads and the amax cotangents of the delayed-FP8 histories."""
    graphdef, params, rest = model_state(cfg, mesh)
    if seed_history:  # a history from earlier steps: the scale comes from it, not the current amax
        rest = jax.tree_util.tree_map_with_path(
            lambda p, v: (
                jnp.full_like(v, 3.0).at[..., 1].set(0.5) if "fp8_meta" in jax.tree_util.keystr(p) else v
            ),
            rest,
        )
    ids = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (8, 33)).astype(np.int32)
    batch = place_batch(
        {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": np.ones((8, 32), np.float32)}, mesh
    )

    def loss(params, rest):
        return lm_objective(nnx.merge(graphdef, params, rest)(batch["input_ids"]), batch, cfg)[0]

    return run(jax.value_and_grad(loss, argnums=(0, 1)), mesh, params, rest)


@pytest.mark.parametrize("transport", ["all_to_all", "allgather"])
@pytest.mark.parametrize("seed_history", [False, True])
def test_delayed_fp8_inside_expert_parallel_transports(transport, seed_history):
    """Delayed scaling in the shard_map transports: one global scale per tensor, and the reported
    amaxes (history cotangents) equal the single-device run."""
    base = [
        "model.num_layers=3",
        "model.dtype=float32",
        "moe.dispatch=capacity",
        "moe.capacity_factor=4.0",
        "precision.fp8=experts",
        "precision.fp8_recipe=delayed",
        "precision.fp8_amax_history=4",
    ]
    ref_loss, (ref_grads, ref_amax) = _fp8_loss_and_grads(
        load_config("configs/tiny_moe.yaml", base), None, seed_history
    )
    cfg = load_config(
        "configs/tiny_moe.yaml", base + ["mesh.data=2", "mesh.expert=4", f"moe.transport={transport}"]
    )
    loss, (grads, amax) = _fp8_loss_and_grads(cfg, build_mesh(cfg), seed_history)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # Gradients pass e5m2 rounding. With a seeded history the scales are fixed and the runs agree
    # closely; on a first step the scale is the current amax of each gradient, so an fp32 reordering
    # upstream moves the scale a little and with it every rounding downstream (~1% here).
    grad_tol, out_tol = (2e-2, 1e-5) if seed_history else (5e-2, 1e-2)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert float(jnp.linalg.norm(a - b)) <= grad_tol * float(jnp.linalg.norm(b)) + 1e-12
    meta = [
        (a, b)
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(amax), jax.tree.leaves(ref_amax))
        if "fp8_meta" in jax.tree_util.keystr(p)
    ]
    assert meta and all(float(jnp.abs(b).max()) > 0 for _, b in meta)
    for a, b in meta:  # rows: inputs x, h and the 3 kernels (forward), then 3 output gradients
        np.testing.assert_allclose(a[..., :5, :], b[..., :5, :], rtol=1e-4)
        np.testing.assert_allclose(a[..., 5:, :], b[..., 5:, :], rtol=out_tol)


class _NodeDevice:
    """A CPU device that says it belongs to process `process_index` (a node; for arranging only)."""

    def __init__(self, device, process_index):
        self.device, self.process_index = device, process_index

    def __getattr__(self, name):
        return getattr(self.device, name)


def test_hybrid_mesh_puts_each_slice_in_its_dcn_block():
    devs = [_NodeDevice(d, i // 4) for i, d in enumerate(jax.devices())]
    slice_of = np.vectorize(lambda d: d.process_index)
    cfg = load_config("configs/tiny_moe.yaml", ["mesh.fsdp=2", "mesh.expert=2", "mesh.dcn.data=2"])
    grid = device_grid(cfg, devs)  # data 2 (both across slices) x fsdp 2 x expert 2
    assert grid.shape == (2, 2, 1, 1, 2, 1)
    assert (slice_of(grid[0]) == 0).all() and (slice_of(grid[1]) == 1).all()
    # pipeline stages across slices, data inside: the slice is the last axis's outer half
    cfg = load_config(
        "configs/tiny_moe.yaml", ["mesh.data=1", "mesh.fsdp=4", "mesh.pipeline=2", "mesh.dcn.pipeline=2"]
    )
    grid = device_grid(cfg, devs)
    assert (slice_of(grid[..., 0]) == 0).all() and (slice_of(grid[..., 1]) == 1).all()
    # a flat mesh ignores slices; a dcn split that is not the job's slice count is one line
    assert device_grid(load_config("configs/tiny_moe.yaml"), devs).shape == (8, 1, 1, 1, 1, 1)
    bad = load_config("configs/tiny_moe.yaml", ["mesh.fsdp=2", "mesh.dcn.data=2", "mesh.dcn.fsdp=2"])
    with pytest.raises(ConfigError, match="spans 4 slices but the job has 2 processes"):
        device_grid(bad, devs)
    with pytest.raises(ConfigError, match="spans 2 slices but the job has 1 processes"):
        build_mesh(load_config("configs/tiny_moe.yaml", ["mesh.dcn.data=2"]))


def test_dcn_settings_are_one_line():
    with pytest.raises(ConfigError, match="mesh.dcn.expert=2 puts expert all-to-alls on the slow network"):
        load_config("configs/tiny_moe.yaml", ["mesh.expert=4", "mesh.dcn.expert=2"])
    load_config(
        "configs/tiny_moe.yaml", ["mesh.expert=4", "mesh.dcn.expert=2", "mesh.allow_cross_slice_experts=true"]
    )
    with pytest.raises(ConfigError, match=r"mesh.dcn.fsdp=2 does not divide mesh.fsdp=3"):
        load_config("configs/tiny_moe.yaml", ["mesh.fsdp=3", "mesh.dcn.fsdp=2"])
    with pytest.raises(ConfigError, match=r"mesh.dcn.data=0 must be >= 1"):
        load_config("configs/tiny_moe.yaml", ["mesh.dcn.data=0"])


def test_lora_dropout_seeds_split_over_pipeline_stages():
    """LoRA's dropout seeds are stacked like the adapters: their layer axis goes to the stages."""
    sets = ["model.num_layers=5", "mesh.data=2", "mesh.pipeline=4", "lora.enabled=true", "lora.dropout=0.1"]
    cfg = load_config("configs/tiny_moe.yaml", sets)
    specs = state_shardings(nnx.state(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))), build_mesh(cfg))
    seed = specs["units"]["moe"]["self_attn"]["q_proj"]["lora"]["dropout_seed"]
    assert seed.spec[0] == "pipeline"
