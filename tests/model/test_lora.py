"""LoRA adapters on the model: a fresh adapter changes nothing; a trained one equals merged weights
W + scale * A B in every MoE dispatch (dropless ragged dots, capacity einsums, both expert-parallel
transports), gradients included; targets resolve by group and pattern with one-line errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import LoraConfig, MoEConfig, load_config
from ernie_jax.errors import ConfigError
from ernie_jax.model import build_model
from ernie_jax.model.lora import FrozenParam, LoraParam, apply_lora, targeted_modules, with_dropout_seeds
from ernie_jax.model.moe import PROJECTIONS, MoEBlock
from ernie_jax.ops.lora import ExpertKernel, buffer_dot, grouped_dot, low_rank, lora_scale
from ernie_jax.trainers.state import split_model


def _mesh(**axes):
    return jax.make_mesh(
        tuple(axes.values()), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes)
    )


def _lora_cfg(**kw):
    return LoraConfig(**{"enabled": True, "rank": 4, "targets": ("experts", "shared_experts"), **kw})


def _block(dispatch, transport="auto", ep=False):
    cfg = MoEConfig(
        num_experts=8,
        top_k=2,
        intermediate_size=16,
        num_shared_experts=1,
        dispatch=dispatch,
        capacity_factor=8.0,  # room for every assignment: all dispatches compute the same function
        transport=transport,
    )
    return MoEBlock(24, cfg, rngs=nnx.Rngs(0), std=0.3, expert_parallel=ep)


def _trained_adapters(block, seed=3):
    """Non-zero B everywhere (a fresh B is 0), so the adapters change the outputs."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    for _, node in nnx.iter_graph(block):
        if (
            isinstance(node, nnx.Module)
            and hasattr(node, "a")
            and isinstance(getattr(node, "b", None), LoraParam)
        ):
            node.b[...] = 0.3 * jax.random.normal(next(keys), node.b[...].shape)
    return block


def _merged(block, scale):
    """A plain block whose kernels are W + scale * a b of `block`'s adapters."""
    plain = _block(block.cfg.dispatch)
    for name in PROJECTIONS:
        ad = getattr(block.experts, name + "_lora")
        getattr(plain.experts, name)[...] = getattr(block.experts, name)[...] + scale * (
            ad.a[...] @ ad.b[...]
        )
        lin = getattr(block.shared_experts, name)
        getattr(plain.shared_experts, name).kernel[...] = lin.kernel[...] + scale * (
            lin.lora.a[...] @ lin.lora.b[...]
        )
    return plain


def test_fresh_adapters_leave_the_model_unchanged_and_freeze_the_rest():
    cfg = load_config("configs/tiny_moe.yaml")
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.model.vocab_size)
    base = build_model(cfg, nnx.Rngs(0))
    lcfg = dataclasses.replace(cfg, lora=_lora_cfg(targets=("attention", "mlp", "shared_experts", "experts")))
    model = build_model(lcfg, nnx.Rngs(0))
    np.testing.assert_array_equal(model(ids).logits, base(ids).logits)  # B = 0: exactly the base
    params = nnx.state(model, nnx.Param)
    assert all(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(params))
    frozen = nnx.state(model, FrozenParam)
    assert len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(nnx.state(base, nnx.Param)))
    # stacked like their kernels: [units, experts, H, r] for the routed experts
    a = model.units.moe.mlp.experts.gate_proj_lora.a[...]
    assert a.shape == (3, cfg.moe.num_experts, cfg.model.hidden_size, 4)


@pytest.mark.parametrize(
    "dispatch,transport,mesh",
    [
        ("dropless", "auto", None),
        ("capacity", "auto", None),
        ("dropless", "auto", {"data": 2, "context": 2}),
        ("capacity", "all_to_all", {"data": 2, "expert": 4}),
        ("capacity", "allgather", {"data": 2, "expert": 4}),
    ],
)
def test_adapters_equal_merged_weights_with_grads(dispatch, transport, mesh):
    block = _block(dispatch, transport, ep=mesh is not None and "expert" in mesh)
    lcfg = _lora_cfg()
    _trained_adapters(apply_lora(block, lcfg, jax.random.key(1)))
    scale = lora_scale(lcfg.alpha, lcfg.rank, lcfg.rslora)
    x = jax.random.normal(jax.random.key(5), (4, 16, 24))
    mask = jnp.ones((4, 16), bool).at[1, 2:9].set(False)
    plain = _merged(block, scale)
    want = plain(x, mask)[0]

    # gradients w.r.t. the adapters, against differentiating through the merged kernels
    graphdef, state = nnx.split(plain)
    pure = nnx.to_pure_dict(state)

    def merged_loss(ab):
        experts = {
            **pure["experts"],
            **{n: getattr(block.experts, n)[...] + scale * (ab[n][0] @ ab[n][1]) for n in PROJECTIONS},
        }
        return jnp.sum(nnx.merge(graphdef, {**pure, "experts": experts})(x, mask)[0] ** 2)

    ab = {
        n: (getattr(block.experts, n + "_lora").a[...], getattr(block.experts, n + "_lora").b[...])
        for n in PROJECTIONS
    }
    want_g = jax.grad(merged_loss)(ab)
    loss = lambda m: jnp.sum(m(x, mask)[0] ** 2)
    if mesh is None:
        y = block(x, mask)[0]
        g = nnx.grad(loss)(block)
    else:
        with jax.set_mesh(_mesh(**mesh)):
            y = nnx.jit(lambda m: m(x, mask)[0])(block)
            g = nnx.jit(nnx.grad(loss))(block)
    np.testing.assert_allclose(y, want, atol=2e-5)
    for n in PROJECTIONS:
        got = g.experts[n + "_lora"]
        for i, k in enumerate("ab"):
            ref = want_g[n][i]
            np.testing.assert_allclose(got[k][...], ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))


def test_targets_by_group_and_pattern_and_errors():
    cfg = load_config("configs/tiny_moe.yaml")
    model = build_model(cfg, nnx.Rngs(0))
    paths = [p for p, _ in targeted_modules(model, ("attention",))]
    assert paths and all("/self_attn/" in p for p in paths) and not any(p.startswith("mtp") for p in paths)
    assert [p for p, _ in targeted_modules(model, (r"units/moe/self_attn/(q|v)_proj$",))] == [
        "units/moe/self_attn/q_proj",
        "units/moe/self_attn/v_proj",
    ]
    with pytest.raises(
        ConfigError, match=r"'vit' matches nothing in this model; its groups are attention, mlp"
    ):
        targeted_modules(model, ("vit",))
    with pytest.raises(ConfigError, match="lora.rank=0 must be > 0"):
        load_config("configs/tiny_moe.yaml", ["lora.enabled=true", "lora.rank=0"])
    with pytest.raises(ConfigError, match="neither a group"):
        load_config("configs/tiny_moe.yaml", ["lora.enabled=true", "lora.targets=[attention,(]"])
    with pytest.raises(ConfigError, match="dpo.reference=base needs adapters"):
        load_config("configs/dpo_tiny.yaml", ["dpo.reference=base"])


def test_dropout_is_off_in_the_state_and_unbiased_when_the_step_sets_keys():
    cfg = load_config(
        "configs/tiny_dense.yaml", ["model.num_layers=2", "lora.enabled=true", "lora.dropout=0.25"]
    )
    model = build_model(cfg, nnx.Rngs(0))
    _trained_adapters(model)
    graphdef, params, buffers, base = split_model(model)
    plain_cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))
    plain = nnx.merge(split_model(build_model(plain_cfg, nnx.Rngs(0)))[0], params, base, {})
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.model.vocab_size)
    want = plain(ids).logits
    # zero seeds (eval, generation, the stored state): no dropout at all
    np.testing.assert_array_equal(nnx.merge(graphdef, params, buffers, base)(ids).logits, want)
    seeded = with_dropout_seeds(buffers, jax.random.key(7))
    seeds = np.asarray(seeded["prefix"]["self_attn"]["q_proj"]["lora"]["dropout_seed"])
    assert seeds.shape == (2, 2) and not np.array_equal(seeds[0], seeds[1])  # one mask per layer
    got = nnx.merge(graphdef, params, seeded, base)(ids).logits
    assert float(jnp.abs(got - want).max()) > 1e-3
    # inverted dropout: the adapter's output is unbiased over masks
    q = plain.prefix.self_attn.q_proj
    x = jax.random.normal(jax.random.key(2), (4, cfg.model.hidden_size))
    a, b, scale = q.lora.a[0], q.lora.b[0], q.lora.scale
    keys = jax.random.key_data(jax.random.split(jax.random.key(3), 4000))
    mean = jax.vmap(lambda s: low_rank(x, a, b, scale, 0.25, s))(keys).mean(0)
    exact = low_rank(x, a, b, scale)
    np.testing.assert_allclose(mean, exact, atol=0.06 * float(jnp.abs(exact).max()))


def test_expert_dropout_reaches_both_dispatches():
    e, k, n, r = 4, 8, 6, 2
    ks = jax.random.split(jax.random.key(0), 4)
    w = ExpertKernel(
        jax.random.normal(ks[0], (e, k, n)),
        jax.random.normal(ks[1], (e, k, r)),
        jax.random.normal(ks[2], (e, r, n)),
        0.5,
        0.5,
        jnp.zeros((2,), jnp.uint32),
    )
    xs = jax.random.normal(ks[3], (10, k))
    sizes = jnp.array([3, 2, 4, 1], jnp.int32)
    off = grouped_dot(xs, w, sizes)
    np.testing.assert_allclose(off, grouped_dot(xs, w.replace(rate=0.0, seed=None), sizes), atol=1e-6)
    on = grouped_dot(xs, w.replace(seed=jax.random.key_data(jax.random.key(1))), sizes)
    assert float(jnp.abs(on - off).max()) > 1e-3
    buf = xs[:8].reshape(e, 2, k)
    on_buf = buffer_dot(buf, w.replace(seed=jax.random.key_data(jax.random.key(1))))
    assert float(jnp.abs(on_buf - buffer_dot(buf, w)).max()) > 1e-3


def test_expert_dropout_runs_inside_the_expert_parallel_shard_map():
    block = _block("capacity", "all_to_all", ep=True)
    _trained_adapters(apply_lora(block, _lora_cfg(dropout=0.25), jax.random.key(1)))
    x = jax.random.normal(jax.random.key(5), (4, 16, 24))
    mask = jnp.ones((4, 16), bool)
    with jax.set_mesh(_mesh(data=2, expert=4)):
        off = nnx.jit(lambda m: m(x, mask)[0])(block)
        for name in PROJECTIONS:
            getattr(block.experts, name + "_lora").dropout_seed[...] = jax.random.key_data(jax.random.key(2))
        on = nnx.jit(lambda m: m(x, mask)[0])(block)
    lcfg = _lora_cfg()
    np.testing.assert_allclose(
        off, _merged(block, lora_scale(lcfg.alpha, lcfg.rank, lcfg.rslora))(x, mask)[0], atol=2e-5
    )
    assert float(jnp.abs(on - off).max()) > 1e-3
