"""The heterogeneous MoE layer, 3D RoPE, vision layout and the VL training switches."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ernie_jax.config import load_config
from ernie_jax.model import build_model
from ernie_jax.model.moe import MoEBlock
from ernie_jax.model.rope import rope_angles, rope_angles_3d
from ernie_jax.model.vision import vision_layout
from ernie_jax.trainers.lm import lm_objective
from ernie_jax.trainers.state import make_optimizer, param_groups


def _cfg(*sets):
    return load_config("configs/tiny_vl.yaml", list(sets))


def test_3d_rope_reduces_to_1d_on_text():
    pos = jnp.arange(12).reshape(1, 12)
    a1 = rope_angles(pos, 32, 1e4)
    a3 = rope_angles_3d(jnp.repeat(pos[..., None], 3, -1), 32, 1e4, 4)
    np.testing.assert_allclose(a3, a1)


def test_3d_rope_frequency_allocation():
    """Lowest t_freq pairs follow t; the rest alternate h (even) / w (odd)."""
    pos = jnp.array([[[5, 0, 0], [0, 7, 0], [0, 0, 9]]])
    a = np.asarray(rope_angles_3d(pos, 32, 1e4, 4))[0]
    half = 16
    assert np.all(a[0, : half - 4] == 0) and np.all(a[0, half - 4 :] > 0)
    assert (
        np.all(a[1, 0 : half - 4 : 2] > 0)
        and np.all(a[1, 1 : half - 4 : 2] == 0)
        and np.all(a[1, half - 4 :] == 0)
    )
    assert np.all(a[2, 1 : half - 4 : 2] > 0) and np.all(a[2, 0 : half - 4 : 2] == 0)


def test_vision_layout_pairs_frames():
    lay = vision_layout(np.array([[1, 2, 4], [4, 2, 2]]), 2)
    assert lay["frame_ids"].tolist() == [1] * 8 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4
    # image: 2 merged rows, each paired with itself; video: 4 frames of 1 row -> pairs (0,1), (2,3)
    assert lay["pair_first"].tolist() == [0, 1, 2, 4] and lay["pair_second"].tolist() == [0, 1, 3, 5]
    padded = vision_layout(np.array([[1, 2, 4]]), 2, num_patches=16, num_rows=4)
    assert padded["frame_ids"].tolist()[8:] == [0] * 8 and padded["row_valid"].tolist() == [
        True,
        True,
        False,
        False,
    ]


def _block(dispatch="capacity"):
    cfg = _cfg(f"moe.dispatch={dispatch}", "moe.capacity_factor=8.0")
    return cfg, MoEBlock(32, cfg.moe, rngs=nnx.Rngs(0), std=0.3)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_modality_isolated_routing(dispatch):
    """Changing the vision experts never changes text tokens' outputs and vice versa."""
    _, block = _block(dispatch)
    x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    modality = jnp.array([[0, 0, 1, 1, 1, 0, 0, 1, 0, 0]] * 2)
    mask = jnp.ones((2, 10))
    y0, stats = block(x, mask, modality)
    block.vision_experts.down_proj[...] = block.vision_experts.down_proj[...] * 3.0
    y1, _ = block(x, mask, modality)
    text = modality == 0
    np.testing.assert_allclose(y1[text], y0[text], atol=1e-6)
    assert np.abs(y1[~text] - y0[~text]).max() > 1e-3
    block.experts.down_proj[...] = block.experts.down_proj[...] * 3.0
    y2, _ = block(x, mask, modality)
    np.testing.assert_allclose(y2[~text], y1[~text], atol=1e-6)
    # every assignment lands in its own group: loads count each modality's tokens x top_k
    assert (
        float(stats["text"].expert_load.sum()) == 2 * 6 * 2
        and float(stats["vision"].expert_load.sum()) == 2 * 4 * 2
    )


def test_per_modality_router_losses_use_only_their_tokens():
    from ernie_jax.model import router_losses as rl

    _, block = _block()
    x = jax.random.normal(jax.random.key(2), (1, 8, 32))
    modality = jnp.array([[0, 1, 1, 0, 1, 0, 0, 1]])
    _, stats = block(x, jnp.ones((1, 8)), modality)
    xt = x.reshape(8, 32)
    vis = np.asarray(modality.reshape(-1) > 0)
    for group, gate, sel in (("text", block.gate, ~vis), ("vision", block.vision_gate, vis)):
        logits = gate(xt)
        z = rl.z_loss(logits, jnp.asarray(sel))
        np.testing.assert_allclose(stats[group].z_loss, z, rtol=1e-6)
        np.testing.assert_allclose(
            stats[group].z_loss, rl.z_loss(logits[sel], jnp.ones(sel.sum())), rtol=1e-6
        )


def test_dispatch_modes_agree_with_enough_capacity():
    cfg, cap = _block("capacity")
    drop = MoEBlock(32, dataclasses.replace(cfg.moe, dispatch="dropless"), rngs=nnx.Rngs(0), std=0.3)
    x = jax.random.normal(jax.random.key(3), (2, 9, 32))
    modality = (jax.random.uniform(jax.random.key(4), (2, 9)) > 0.5).astype(jnp.int32)
    np.testing.assert_allclose(
        cap(x, jnp.ones((2, 9)), modality)[0], drop(x, jnp.ones((2, 9)), modality)[0], atol=1e-5
    )


def test_token_balanced_loss_gradient_and_logged_value():
    cfg = _cfg(
        "train.token_balanced_loss=true",
        "moe.aux_loss_weight=0",
        "moe.z_loss_weight=0",
        "moe.orth_loss_weight=0",
    )
    logits = jax.random.normal(jax.random.key(0), (2, 6, 11))
    labels = jnp.array([[1, 2, 3, 4, 5, 6]] * 2)
    mask = jnp.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], jnp.float32)
    batch = {"labels": labels, "loss_mask": mask}

    def run(lg, c):
        from ernie_jax.model.ernie import ModelOutput

        zero = jnp.zeros(())
        out = ModelOutput(logits=lg, router_losses={"aux_loss": zero, "z_loss": zero, "orth_loss": zero})
        return lm_objective(out, batch, c)

    (val, metrics), grad = jax.value_and_grad(run, has_aux=True)(logits, cfg)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(val, jnp.sum(ce * mask) / jnp.sum(mask), rtol=1e-6)  # logged: the mean
    want = jax.grad(
        lambda lg: (
            jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(lg), labels[..., None], -1)[..., 0] * mask)
            / mask.size
        )
    )(logits)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)  # gradient: sum / N


def test_freeze_groups_get_no_updates_and_no_state():
    cfg = _cfg("train.freeze=[vit, adapter]")
    model = build_model(cfg, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    labels = param_groups(params, cfg.train.freeze)
    assert set(jax.tree.leaves(labels["vision_model"])) == {"frozen"}
    assert set(jax.tree.leaves(labels["resampler"])) == {"frozen"}
    assert "frozen" not in jax.tree.leaves(labels["units"])
    tx = make_optimizer(cfg.optimizer, 10, cfg.train.freeze)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(new["vision_model"]), jax.tree.leaves(params["vision_model"])):
        np.testing.assert_array_equal(a, b)
    n_state = sum(x.size for x in jax.tree.leaves(state))
    n_train = sum(
        leaf.size
        for k, x in params.items()
        if k not in ("vision_model", "resampler")
        for leaf in jax.tree.leaves(x)
    )
    assert n_state <= 2 * n_train + 100  # moments only for trainable params


def test_modality_detach_zeroes_language_model_grads():
    from ernie_jax.trainers.step import _detach_language_model

    cfg = _cfg("train.modality_detach=true")
    grads = {
        "embed_tokens": {"embedding": jnp.ones(3)},
        "vision_model": {"ln": {"weight": jnp.ones(3)}},
        "units": {
            "moe": {"mlp": {"vision_experts": {"up_proj": jnp.ones(2)}, "experts": {"up_proj": jnp.ones(2)}}}
        },
    }
    with_vision = _detach_language_model(
        grads, {"input_ids": jnp.array([[5, cfg.vision.image_token_id]])}, cfg
    )
    assert float(with_vision["embed_tokens"]["embedding"].sum()) == 0
    assert float(with_vision["units"]["moe"]["mlp"]["experts"]["up_proj"].sum()) == 0
    assert float(with_vision["units"]["moe"]["mlp"]["vision_experts"]["up_proj"].sum()) == 2
    assert float(with_vision["vision_model"]["ln"]["weight"].sum()) == 3
    text_only = _detach_language_model(grads, {"input_ids": jnp.array([[5, 6]])}, cfg)
    assert float(text_only["embed_tokens"]["embedding"].sum()) == 3
