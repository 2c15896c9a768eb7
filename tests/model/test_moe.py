import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import MoEConfig
from ernie_jax.model.moe import MoEBlock, capacity_experts, dropless_for, expert_capacity, route
from ernie_jax.ops import moe_dispatch
from ernie_jax.ops.lora import ExpertKernel
from ernie_jax.ops.moe_dispatch import dropless_experts, every_expert, gathered_experts


def _block(dispatch="dropless", factor=1.0, shared=1, e=8, k=2, seed=0):
    cfg = MoEConfig(
        num_experts=e,
        top_k=k,
        intermediate_size=16,
        num_shared_experts=shared,
        dispatch=dispatch,
        capacity_factor=factor,
    )
    return MoEBlock(24, cfg, rngs=nnx.Rngs(seed), std=0.3)


def _reference(block, x):
    """Per-token loop over the chosen experts: the definition of the MoE output."""
    cfg = block.cfg
    xt = np.asarray(x.reshape(-1, x.shape[-1]), np.float64)
    gate, up, down = [np.asarray(k, np.float64) for k in block.experts.kernels()]
    probs, idx, w = route(
        block.gate(jnp.asarray(xt, jnp.float32)), block.gate.correction_bias[...], cfg.top_k, cfg.norm_min
    )
    out = np.zeros_like(xt)
    silu = lambda a: a / (1 + np.exp(-a))
    for t in range(xt.shape[0]):
        for j in range(cfg.top_k):
            e = int(idx[t, j])
            out[t] += float(w[t, j]) * (silu(xt[t] @ gate[e]) * (xt[t] @ up[e])) @ down[e]
    return out


def test_dropless_matches_per_token_reference():
    block = _block(shared=0)
    x = jax.random.normal(jax.random.key(0), (2, 5, 24))
    y, stats = block(x, jnp.ones((2, 5), bool))
    np.testing.assert_allclose(np.asarray(y).reshape(10, 24), _reference(block, x), atol=1e-4)
    assert float(stats["text"].dropped) == 0
    assert float(stats["text"].expert_load.sum()) == 20  # 10 tokens x top-2


def test_capacity_equals_dropless_with_room_and_grads_match():
    x = jax.random.normal(jax.random.key(1), (2, 6, 24))
    mask = jnp.ones((2, 6), bool)
    a, b = _block("dropless"), _block("capacity", factor=4.0)

    def loss(block):
        y, _ = block(x, mask)
        return jnp.sum(jnp.sin(y))

    np.testing.assert_allclose(a(x, mask)[0], b(x, mask)[0], atol=1e-5)
    ga, gb = nnx.grad(loss)(a), nnx.grad(loss)(b)
    for la, lb in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):  # fp32, summed in another order
        np.testing.assert_allclose(la, lb, atol=1e-5 * max(1.0, float(jnp.abs(lb).max())))


def test_capacity_drops_count_and_shared_still_applies():
    block = _block("capacity", factor=0.25, shared=1)
    x = jax.random.normal(jax.random.key(2), (1, 32, 24))
    mask = jnp.ones((1, 32), bool)
    y, stats = block(x, mask)
    cap = expert_capacity(32, 2, 8, 0.25)
    assert cap == 2
    load = np.asarray(stats["text"].expert_load)
    expected_drops = np.maximum(load - cap, 0).sum()
    assert float(stats["text"].dropped) == expected_drops > 0
    # a token whose every assignment was dropped still gets the shared expert output
    xt = x.reshape(32, 24)
    _, idx, w = route(block.gate(xt), block.gate.correction_bias[...], 2, 1e-12)
    _, kept = capacity_experts(xt, idx, w, jnp.ones(32), block.experts.kernels(), cap)
    fully_dropped = np.where(~np.asarray(kept).any(-1))[0]
    assert fully_dropped.size > 0
    t = fully_dropped[0]
    np.testing.assert_allclose(y[0, t], block.shared_experts(xt[t : t + 1])[0], atol=1e-5)


def test_padding_takes_no_capacity_and_no_load():
    padded = _block("capacity", factor=1.0)  # T=16 -> capacity 4
    real_only = _block("capacity", factor=2.0)  # T=8  -> capacity 4, same weights (same seed)
    x = jax.random.normal(jax.random.key(3), (1, 16, 24))
    mask = jnp.arange(16)[None] < 8
    y_pad, stats = padded(x, mask)
    y_real, stats_real = real_only(x[:, :8], jnp.ones((1, 8), bool))
    assert float(stats["text"].expert_load.sum()) == 16  # 8 real tokens x 2
    assert float(stats["text"].dropped) == float(stats_real["text"].dropped)
    np.testing.assert_allclose(y_pad[:, :8], y_real, atol=1e-5)


def test_bias_changes_selection_not_weights():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    probs, idx, w = route(logits, jnp.zeros(4), 2, 1e-12)
    assert list(np.asarray(idx[0])) == [0, 1]
    _, idx_b, w_b = route(logits, jnp.array([0.0, 0.0, 5.0, 0.0]), 2, 1e-12)
    assert sorted(np.asarray(idx_b[0]).tolist()) == [0, 2]
    p = np.asarray(probs[0])
    np.testing.assert_allclose(
        sorted(np.asarray(w_b[0])), sorted([p[0] / (p[0] + p[2]), p[2] / (p[0] + p[2])]), rtol=1e-6
    )


def test_dispatch_functions_are_jittable_without_python_loops():
    x = jnp.ones((1, 80, 24))
    blocks = {e: _block("dropless", e=e, k=4) for e in (16, 64)}
    program = lambda e, x: str(jax.make_jaxpr(lambda x: blocks[e](x, jnp.ones(x.shape[:2], bool))[0])(x))
    # grouped matmuls (ragged_dot on GPU / TPU, row blocks on CPU) whose program does not grow with E
    assert "ragged_dot_general[" in program(64, x)
    assert program(64, x).count(" = ") == program(16, x).count(" = ")  # equations, not printed lines
    # at most E tokens (a decode step): every expert densely, no ragged groups
    assert "ragged_dot_general[" not in program(64, x[:, :8])
    assert dropless_for(8, 4, 64) is gathered_experts and dropless_for(16, 4, 64) is every_expert


@pytest.mark.parametrize(
    "path, lora",
    [(every_expert, False), (gathered_experts, False), (gathered_experts, True)],
    ids=["every_expert", "gathered", "gathered_lora"],
)
def test_decode_paths_equal_dropless_with_grads(path, lora):
    """The decode-size paths: the same outputs and gradients as sorting into ragged groups, with
    tokens of another group / padding (live=False) contributing nothing; LoRA expert kernels too."""
    t, h, e, inter, k = 6, 16, 8, 12, 2
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (t, h))
    kernels = (
        0.25 * jax.random.normal(keys[1], (e, h, inter)),
        0.25 * jax.random.normal(keys[2], (e, h, inter)),
        0.25 * jax.random.normal(keys[3], (e, inter, h)),
    )
    if lora:  # rank-2 adapters on every routed kernel
        adapter = lambda w, key: ExpertKernel(
            w,
            0.3 * jax.random.normal(key, (e, w.shape[1], 2)),
            jax.random.normal(key, (e, 2, w.shape[2])),
            0.5,
        )
        kernels = tuple(adapter(w, key) for w, key in zip(kernels, keys[5:]))
    _, idx, weights = route(jax.random.normal(keys[4], (t, e)), jnp.zeros(e), k, 1e-12)
    live = jnp.array([True, True, False, True, True, False])

    def loss(fn, x, kernels):
        return jnp.sum(jnp.sin(fn(x, idx, weights, kernels, live=live)))

    for want, got in zip(
        jax.value_and_grad(lambda *a: loss(dropless_experts, *a), argnums=(0, 1))(x, kernels),
        jax.value_and_grad(lambda *a: loss(path, *a), argnums=(0, 1))(x, kernels),
    ):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    y = path(x, idx, weights, kernels, live=live)
    assert float(jnp.abs(y[2]).max()) == 0.0 and float(jnp.abs(y[5]).max()) == 0.0
    if path is gathered_experts:  # the GPU / TPU branch (one gather) equals the CPU one (a scan)
        xs, flat = jnp.repeat(x, k, axis=0)[:, None], idx.reshape(-1)
        np.testing.assert_allclose(
            moe_dispatch._experts_gathered(xs, flat, kernels, None),
            moe_dispatch._experts_one_by_one(xs, flat, kernels, None),
            rtol=1e-5,
            atol=1e-6,
        )


def _mesh(**axes):
    return jax.make_mesh(
        tuple(axes.values()), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes)
    )


def test_capacity_is_per_device_under_a_mesh():
    """Under data x context sharding each device dispatches its own tokens with its own capacity
    (drops included): the block equals running it on each device's block of rows and sequence."""
    block = _block("capacity", factor=0.5, shared=1)
    x = jax.random.normal(jax.random.key(4), (4, 16, 24))
    mask = jnp.ones((4, 16), bool).at[0, 3:7].set(False)
    with jax.set_mesh(_mesh(data=2, context=2)):
        y, stats = nnx.jit(lambda m, x, mask: m(x, mask))(block, x, mask)
    parts, dropped = [], 0.0
    for r in range(2):
        row = []
        for c in range(2):
            yp, sp = block(
                x[2 * r : 2 * r + 2, 8 * c : 8 * c + 8], mask[2 * r : 2 * r + 2, 8 * c : 8 * c + 8]
            )
            row.append(yp)
            dropped += float(sp["text"].dropped)
        parts.append(jnp.concatenate(row, axis=1))
    np.testing.assert_allclose(y, jnp.concatenate(parts, axis=0), atol=1e-5)
    assert float(stats["text"].dropped) == dropped > 0


def test_dropless_under_a_mesh_equals_one_device_with_grads():
    """Dropless runs one unbatched ragged dot per device inside a shard_map (the TPU compiler takes
    no batched ragged dot): output and gradients equal the block without a mesh."""
    block = _block("dropless", shared=1)
    x = jax.random.normal(jax.random.key(5), (4, 16, 24))
    mask = jnp.ones((4, 16), bool).at[1, 2:9].set(False)
    loss = lambda m, x: jnp.sum(m(x, mask)[0] ** 2)
    ref_y, ref_stats = block(x, mask)
    ref_g = nnx.grad(loss)(block, x)
    with jax.set_mesh(_mesh(data=2, context=2)):
        y, stats = nnx.jit(lambda m, x: m(x, mask))(block, x)
        g = nnx.jit(nnx.grad(loss))(block, x)
    np.testing.assert_allclose(y, ref_y, atol=1e-5)
    np.testing.assert_array_equal(stats["text"].expert_load, ref_stats["text"].expert_load)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):  # sums over devices: reassociated
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))


def test_dispatch_buffers_stay_per_device_under_data_parallelism():
    """Compiled fwd+bwd temp memory per device with 8-way data parallelism stays that of one
    device's tokens (over all tokens at once the [E, C, H] buffers were replicated: 8x)."""
    block = _block("capacity", factor=1.5, shared=0)

    def temp(batch, mesh):
        x, mask = jnp.ones((batch, 256, 24)), jnp.ones((batch, 256), bool)
        grad = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x, mask)[0] ** 2)))
        if mesh is None:
            return grad.lower(block, x).compile().memory_analysis().temp_size_in_bytes
        with jax.set_mesh(mesh):
            x = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
            return grad.lower(block, x).compile().memory_analysis().temp_size_in_bytes

    assert temp(8, _mesh(data=8)) < 1.5 * temp(1, None)
