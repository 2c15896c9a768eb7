"""LoRA training end to end: a run from Hugging Face weights trains adapters only (optimizer moments
for adapters alone, no base in the checkpoint), resumes exactly, and exports merged weights and a PEFT
adapter that transformers / PEFT load with logits equal to ours; adapters start a new run."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ernie_jax.config import load_config
from ernie_jax.convert import ernie_to_hf, load_pretrained
from ernie_jax.errors import CheckpointError, ConfigError
from ernie_jax.model import build_model
from ernie_jax.trainers.loop import run
from ernie_jax.trainers.pretrain import text_pretraining_task
from ernie_jax.trainers.stages import run_stages
from ernie_jax.trainers.state import split_model
from tests.hf_reference import make_hf_model
from tests.trainers.test_init_from import MATCHING

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

LORA = [
    "lora.enabled=true",
    "lora.rank=4",
    "lora.targets=[attention,mlp,shared_experts,experts]",
    "moe.dispatch=dropless",
    "optimizer.learning_rate=0.02",
    "optimizer.warmup_steps=0",
    "checkpoint.interval=2",
    "train.steps=4",
    "model.rope_theta=500000",  # the HF model's (check_same_model compares shapes only)
]


def _cfg(src, *extra):
    return load_config("configs/tiny_moe.yaml", MATCHING + LORA + [f"checkpoint.init_from={src}", *extra])


def _state(workdir, step):
    with ocp.StandardCheckpointer() as c:
        return c.restore(str(workdir / "checkpoints" / str(step) / "state"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    _, src = make_hf_model(tmp, vocab=4096, bias_scale=0.3)
    workdir = tmp / "w"
    run(_cfg(src), str(workdir), text_pretraining_task, quiet=True)
    return src, workdir


def test_only_adapters_train_and_are_checkpointed(trained):
    src, workdir = trained
    state = _state(workdir, 4)
    assert "base" not in state  # adapters only (lora.save_base=false)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])]
    assert paths and all("lora" in p for p in paths)
    n_adapter = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
    assert n_moments == 2 * n_adapter  # Adam's two moments, for adapters alone
    b = state["params"]["units"]["moe"]["mlp"]["experts"]["down_proj_lora"]["b"]
    assert np.abs(b).max() > 0  # B left zero and learned


def test_resume_is_exact(trained, tmp_path):
    src, workdir = trained
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "4")
    run(_cfg(src), str(copy), text_pretraining_task, quiet=True)
    for a, b in zip(
        jax.tree.leaves(_state(workdir, 4)["params"]), jax.tree.leaves(_state(copy, 4)["params"])
    ):
        np.testing.assert_array_equal(a, b)


def _ours(src, workdir):
    """Our LoRA model, unmerged: the HF base with the run's adapters beside it."""
    cfg = _cfg(src)
    graphdef, _, _, base = split_model(build_model(cfg, nnx.Rngs(0)))
    full = nnx.to_pure_dict(nnx.state(load_pretrained(src), nnx.Param))
    state = _state(workdir, 4)
    base = jax.tree.map(lambda _, w: w, base, full)
    return nnx.merge(graphdef, state["params"], state["buffers"], base)


def test_merged_and_peft_exports_equal_our_logits(trained, tmp_path):
    src, workdir = trained
    ids = np.random.default_rng(0).integers(5, 4000, (2, 20))
    ours = np.asarray(_ours(src, workdir)(jnp.asarray(ids)).logits)
    merged = str(tmp_path / "merged")
    ernie_to_hf(str(workdir), merged, quiet=True, merge_lora=True)
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        np.testing.assert_allclose(hf(torch.tensor(ids)).logits.numpy(), ours, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(load_pretrained(str(workdir))(jnp.asarray(ids)).logits), ours, atol=1e-5
    )
    adapter = str(tmp_path / "peft")
    ernie_to_hf(str(workdir), adapter, quiet=True, lora_adapter=True)
    conf = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert (conf["r"], conf["lora_alpha"], conf["peft_type"]) == (4, 8, "LORA")
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        model = peft.PeftModel.from_pretrained(base, adapter).eval()
        np.testing.assert_allclose(model(torch.tensor(ids)).logits.numpy(), ours, atol=1e-5)
    with pytest.raises(CheckpointError, match="is a LoRA run: pass --merge-lora"):
        ernie_to_hf(str(workdir), str(tmp_path / "x"), quiet=True)


@pytest.mark.slow
def test_adapters_start_a_run_from_peft_or_workdir(trained, tmp_path):
    src, workdir = trained
    adapter = str(tmp_path / "peft")
    ernie_to_hf(str(workdir), adapter, quiet=True, lora_adapter=True)
    want = _state(workdir, 4)["params"]
    for i, init in enumerate((adapter, str(workdir))):
        out = tmp_path / f"w{i}"
        cfg = _cfg(src, f"lora.init_from={init}", "optimizer.learning_rate=0", "train.steps=1")
        run(cfg, str(out), text_pretraining_task, quiet=True)
        for a, b in zip(jax.tree.leaves(_state(out, 1)["params"]), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    cfg = _cfg(src, f"lora.init_from={adapter}", "lora.rank=8")
    with pytest.raises(CheckpointError, match="r=4 but this run has 8"):
        run(cfg, str(tmp_path / "bad"), text_pretraining_task, quiet=True)


def test_frozen_targets_are_refused(trained, tmp_path):
    src, _ = trained
    cfg = _cfg(src, "train.freeze=[language_model]")
    with pytest.raises(ConfigError, match="only reach the frozen group"):
        run(cfg, str(tmp_path / "w"), text_pretraining_task, quiet=True)
    assert not os.path.exists(tmp_path / "w" / "checkpoints" / "1")
    assert dataclasses.is_dataclass(cfg.lora)


@pytest.mark.slow
def test_saved_bf16_base_exports_without_its_source(trained, tmp_path):
    src, _ = trained
    workdir = tmp_path / "w"
    cfg = _cfg(src, "lora.save_base=true", "lora.base_dtype=bfloat16", "train.steps=2")
    run(cfg, str(workdir), text_pretraining_task, quiet=True)
    state = _state(workdir, 2)
    kernel = state["base"]["units"]["moe"]["mlp"]["experts"]["gate_proj"]
    assert kernel.dtype == jnp.bfloat16  # the frozen base at half the bytes
    # the export needs no checkpoint.init_from: move the source away
    moved = str(tmp_path / "moved_src")
    shutil.copytree(src, moved)
    shutil.rmtree(src)
    try:
        got = load_pretrained(str(workdir)).units.moe.mlp.experts.gate_proj[...]
    finally:
        shutil.copytree(moved, src)
    ad = state["params"]["units"]["moe"]["mlp"]["experts"]["gate_proj_lora"]
    want = np.asarray(kernel, np.float32) + 2.0 * (ad["a"] @ ad["b"])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_lora_stages_carry_adapters_and_keep_the_base(trained, tmp_path):
    src, workdir = trained
    recipe = tmp_path / "stages.yaml"
    recipe.write_text(
        f"base: {os.path.abspath('configs/tiny_moe.yaml')}\n"
        "stages:\n"
        "  - {name: one, steps: 2}\n"
        "  - {name: two, steps: 1, set: [optimizer.learning_rate=0]}\n"
    )
    cfg = load_config(str(recipe), MATCHING + LORA + [f"checkpoint.init_from={src}", "checkpoint.interval=1"])
    run_stages(cfg, str(tmp_path / "s"), quiet=True)
    one, two = (_state(tmp_path / "s" / d, n) for d, n in (("1_one", 2), ("2_two", 1)))
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
        np.testing.assert_array_equal(a, b)  # lr 0: stage two holds stage one's adapters
