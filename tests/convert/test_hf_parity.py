"""fp32 logits of converted tiny transformers models match ours to 1e-5 (ERNIE45 spec sections 2, 8)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import ernie_jax
from ernie_jax.convert import model_from_params
from tests.hf_reference import hf_logits, make_hf_model

pytest.importorskip("transformers")
pytestmark = pytest.mark.parity

CASES = {
    "dense_tied": dict(moe=False, tie=True),
    "dense_untied": dict(moe=False, tie=False),
    "moe_shared0": dict(shared=0),
    "moe_shared1_untied": dict(shared=1, tie=False),
    "moe_shared2": dict(shared=2),
    "moe_start2_interval2": dict(start=2, interval=2, layers=5),
    "moe_biased_selection": dict(bias_scale=0.5, experts=8, top_k=2),
}


def _ids(rng, b, s):
    return rng.integers(3, 97, size=(b, s)).astype(np.int64)


def _ours(model, ids, mask=None):
    seg = None if mask is None else jnp.asarray(mask, jnp.int32)
    return np.asarray(model(jnp.asarray(ids, jnp.int32), segment_ids=seg).logits)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_logits_match_transformers(tmp_path, case, dispatch):
    kw = CASES[case]
    if dispatch == "capacity" and not kw.get("moe", True):
        pytest.skip("dense model has no dispatch")
    hf, path = make_hf_model(tmp_path, **kw)
    ours = ernie_jax.load_pretrained(path, dtype="float32")
    if dispatch == "capacity":
        cfg = ours.architecture()
        # capacity factor E/k gives every expert room for all tokens: nothing is dropped
        cfg = dataclasses.replace(
            cfg,
            moe=dataclasses.replace(
                cfg.moe, dispatch="capacity", capacity_factor=cfg.moe.num_experts / cfg.moe.top_k
            ),
        )
        from flax import nnx

        ours = model_from_params(cfg, nnx.to_pure_dict(nnx.state(ours)))
    rng = np.random.default_rng(0)
    for b, s in [(2, 7), (1, 16)]:
        ids = _ids(rng, b, s)
        np.testing.assert_allclose(_ours(ours, ids), hf_logits(hf, ids), atol=1e-5, rtol=0)
    # right padding: real positions must be unaffected by pad tokens
    ids = _ids(rng, 2, 10)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ref = hf_logits(hf, ids, mask)
    got = _ours(ours, ids, mask)
    np.testing.assert_allclose(got[mask.astype(bool)], ref[mask.astype(bool)], atol=1e-5, rtol=0)


def test_bias_changes_selection(tmp_path):
    """The biased case is meaningful only if the correction bias changes which experts are chosen."""
    hf, path = make_hf_model(tmp_path, bias_scale=0.5, experts=8, top_k=2)
    ours = ernie_jax.load_pretrained(path, dtype="float32")
    bias = np.asarray(ours.units.moe.mlp.gate.correction_bias[...])
    assert np.abs(bias).max() > 0.1
    from flax import nnx

    st = nnx.to_pure_dict(nnx.state(ours))
    st["units"]["moe"]["mlp"]["gate"]["correction_bias"] = np.zeros_like(bias)
    unbiased = model_from_params(ours.architecture(), st)
    ids = _ids(np.random.default_rng(1), 2, 12)
    assert np.abs(_ours(unbiased, ids) - hf_logits(hf, ids)).max() > 1e-3


@pytest.mark.parametrize("kw", [dict(moe=False, tie=False), dict(shared=2, start=2, interval=2, layers=5)])
def test_export_round_trip(tmp_path, kw):
    import transformers as T

    hf, path = make_hf_model(tmp_path, **kw)
    ours = ernie_jax.load_pretrained(path, dtype="float32")
    out = str(tmp_path / "exported")
    ernie_jax.save_pretrained(ours, out, shard_bytes=20_000)  # force several shards
    cls = T.Ernie4_5_MoeForCausalLM if kw.get("moe", True) else T.Ernie4_5ForCausalLM
    reloaded = cls.from_pretrained(out).eval()
    ids = _ids(np.random.default_rng(2), 2, 9)
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))
