import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import load_config
from ernie_jax.model import build_model
from ernie_jax.model.ernie import layer_plan


def _cfg(*overrides):
    return load_config(
        "configs/tiny_moe.yaml",
        [
            "model.num_layers=3",
            "model.hidden_size=64",
            "model.vocab_size=128",
            "model.intermediate_size=96",
            "moe.intermediate_size=32",
            "moe.dispatch=dropless",
            *overrides,
        ],
    )


@pytest.mark.parametrize("moe", ["8", "0"])
def test_packed_documents_do_not_attend_to_each_other(moe):
    model = build_model(_cfg(f"moe.num_experts={moe}", "model.mtp_depth=0"), nnx.Rngs(0))
    rng = np.random.default_rng(0)
    a, b = rng.integers(3, 128, 5), rng.integers(3, 128, 6)
    packed = jnp.asarray(np.concatenate([a, b, [0]])[None], jnp.int32)
    seg = jnp.asarray([[1] * 5 + [2] * 6 + [0]])
    pos = jnp.asarray([list(range(5)) + list(range(6)) + [0]])
    out = model(packed, positions=pos, segment_ids=seg).logits
    alone_b = model(jnp.asarray(b[None], jnp.int32)).logits
    alone_a = model(jnp.asarray(a[None], jnp.int32)).logits
    np.testing.assert_allclose(out[0, 5:11], alone_b[0], atol=2e-5)
    np.testing.assert_allclose(out[0, :5], alone_a[0], atol=2e-5)


def test_trace_size_does_not_grow_with_depth():
    def eqns(layers):
        cfg = _cfg(f"model.num_layers={layers}")
        model = build_model(cfg, nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.ones((1, 8), jnp.int32)).logits)(state)
        return len(jaxpr.jaxpr.eqns)

    assert eqns(3) == eqns(12)


def test_layer_plan_covers_every_layer_once():
    for start, interval, n in [(1, 1, 28), (3, 1, 54), (1, 2, 7), (0, 2, 6), (2, 3, 11)]:
        cfg = load_config(
            "configs/tiny_moe.yaml",
            [f"model.num_layers={n}", f"moe.layer_start={start}", f"moe.layer_interval={interval}"],
        )
        plan = layer_plan(cfg)
        seen = {plan.locate(i) for i in range(n)}
        assert len(seen) == n
        from ernie_jax.config import is_moe_layer

        for i in range(n):
            stack, _, slot = plan.locate(i)
            assert (stack == "units" and slot == plan.dense_per_unit) == is_moe_layer(i, n, cfg.moe)


def test_mtp_uses_next_token_embedding():
    model = build_model(_cfg("model.mtp_depth=2"), nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 128, (1, 9)), jnp.int32)
    out = model(ids)
    assert out.mtp_logits.shape == (2, 1, 9, 128)
    changed = ids.at[0, 5].set((ids[0, 5] + 1) % 128)
    out2 = model(changed)
    # depth 0 at position 3 sees main hidden up to 3 and the embedding of token 4: unchanged by token 5
    np.testing.assert_allclose(out.mtp_logits[0, 0, 3], out2.mtp_logits[0, 0, 3], atol=1e-6)
    # depth 0 at position 4 reads the embedding of token 5
    assert np.abs(out.mtp_logits[0, 0, 4] - out2.mtp_logits[0, 0, 4]).max() > 1e-4


def test_bf16_compute_keeps_fp32_params_and_remat_matches():
    cfg = _cfg("model.dtype=bfloat16")
    model = build_model(cfg, nnx.Rngs(0))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ids = jnp.ones((2, 8), jnp.int32)
    assert model(ids).logits.dtype == jnp.bfloat16

    def grads(remat, names=()):
        c = dataclasses.replace(
            _cfg(), model=dataclasses.replace(_cfg().model, remat=remat, remat_names=names)
        )
        m = build_model(c, nnx.Rngs(0))
        return nnx.grad(lambda m: jnp.mean(m(ids).logits ** 2))(m)

    ref = jax.tree.leaves(grads("none"))
    for policy, names in [
        ("full", ()),
        ("save_qkv_recompute_mlp", ()),
        ("named", ("attn_out", "expert_out")),
    ]:
        for a, b in zip(ref, jax.tree.leaves(grads(policy, names))):
            np.testing.assert_allclose(a, b, atol=1e-6)
