import pytest

from ernie_jax.config import Config, is_moe_layer, load_config, to_json
from ernie_jax.errors import ConfigError


def test_base_inheritance_and_overrides():
    cfg = load_config(
        "configs/tiny_moe.yaml",
        [
            "train.steps=7",
            "moe.top_k=3",
            "model.dtype=bfloat16",
            "optimizer.learning_rate=1e-3",
            "checkpoint.init_from=/x",
        ],
    )
    assert isinstance(cfg, Config)
    assert cfg.model.hidden_size == 128  # from the base file
    assert cfg.moe.num_experts == 8  # from the child file
    assert (cfg.train.steps, cfg.moe.top_k, cfg.model.dtype) == (7, 3, "bfloat16")
    assert cfg.optimizer.learning_rate == pytest.approx(1e-3)
    assert cfg.checkpoint.init_from == "/x"
    assert '"top_k": 3' in to_json(cfg)


def test_frozen():
    cfg = load_config("configs/tiny_moe.yaml")
    with pytest.raises(Exception):
        cfg.model.hidden_size = 3


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("moe.topk=2", "did you mean moe.top_k"),
        ("modle.hidden_size=2", "did you mean model"),
        ("model.num_heads=abc", "model.num_heads='abc' must be an integer"),
        ("model.num_kv_heads=3", "model.num_kv_heads=3 must divide model.num_heads=4"),
        ("moe.top_k=9", "moe.top_k=9 must be between 1 and moe.num_experts=8"),
        ("model.dtype=float16", "model.dtype='float16' is not allowed; use one of bfloat16, float32"),
        ("moe.dispatch=magic", "moe.dispatch='magic' is not allowed"),
        ("model.tie_word_embeddings=3", "must be true or false"),
        ("moe.layer_start=9", "moe.layer_start=9 must be in [0, model.num_layers=4)"),
        ("data.seq_len=100000", "data.seq_len=100000 exceeds model.max_position_embeddings"),
        ("train.steps", "must look like section.key=value"),
        ("model.remat=named", "model.remat=named needs model.remat_names"),
        ("model.remat_names=[qkv, nope]", "'nope' is not a checkpoint name"),
        ("optimizer.clip_norm=-1", "optimizer.clip_norm=-1.0 must be >= 0 (0 turns clipping off)"),
        ("train.freeze=[vit]", "'vit' matches nothing in a text model"),
        ("train.freeze=[vision_experts]", "'vision_experts' matches nothing (moe.vision_num_experts=0)"),
        ("data.eval_fraction=1", "data.eval_fraction=1.0 must be in [0, 1)"),
        ("data.eval_fraction=-0.5", "data.eval_fraction=-0.5 must be in [0, 1)"),
        ("train.eval_steps=0", "train.eval_steps=0 must be >= 1"),
        (
            "stages=[{name: a, steps: 1}, {name: b, steps: 1, set: [model.hidden_size=64]}]",
            "stages[b] has model.hidden_size=64 but stage a before it has model.hidden_size=128",
        ),
    ],
)
def test_bad_values_fail_with_one_line(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny_moe.yaml", [override])
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_moe_placement_rule():
    cfg = load_config("configs/ernie45_300b_a47b.yaml")
    moe = [i for i in range(54) if is_moe_layer(i, 54, cfg.moe)]
    assert moe == list(range(3, 54))
    cfg = load_config("configs/tiny_moe.yaml", ["moe.layer_interval=2", "moe.layer_start=0"])
    assert [i for i in range(4) if is_moe_layer(i, 4, cfg.moe)] == [1, 3]


def test_vision_token_ids_inside_the_vocabulary():
    with pytest.raises(
        ConfigError,
        match=r"vision.video_end_token_id=5000 is outside the vocabulary "
        r"\(model.vocab_size=4104\)",
    ):
        load_config("configs/tiny_vl.yaml", ["vision.video_end_token_id=5000"])
