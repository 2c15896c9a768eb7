"""The config schema: typed, frozen dataclasses, their dict form (unknown keys and wrong types refused
with one line) and `a.b=c` overrides; plus the pure rules derived from them (MoE placement, the
decoder's layer plan, which fields shape the parameters)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from ernie_jax.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Decoder shape and numerics (names follow the ERNIE 4.5 config.json where one exists)."""

    vocab_size: int = 103424
    hidden_size: int = 1024
    num_layers: int = 18
    num_heads: int = 16
    num_kv_heads: int = 2
    head_dim: int = 128
    intermediate_size: int = 3072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    init_std: float = 0.02
    mtp_depth: int = 0  # multi-token-prediction layers (num_nextn_predict_layers)
    mtp_loss_weight: float = 0.1
    remat: Literal[
        "none", "full", "dots_saveable", "save_attention_out", "save_qkv_recompute_mlp", "named"
    ] = "none"
    remat_names: tuple[str, ...] = ()  # with remat: named, e.g. [qkv, attn_out, expert_out]
    remat_offload: bool = False  # named activations go to host memory instead of being kept
    # attention backend (ernie_jax/ops/attention.py): auto = splash on TPU, cudnn on GPU, elsewhere
    # dense up to 512 keys and flash beyond; dense materialises S x S logits (the reference)
    attention: Literal["auto", "dense", "flash", "cudnn", "splash"] = "auto"
    attention_block_q: int = 0  # query tile of flash / splash; 0: the backend's default
    attention_block_kv: int = 0  # key/value tile; 0: the backend's default
    attention_interpret: bool = (
        False  # run the Pallas kernels (splash, GPU) in interpret mode: any platform, slow
    )
    # LM head + cross-entropy (and the MTP heads) over chunks of this many positions per sequence
    # shard, so [B, S, V] logits never exist at once; 0: the whole sequence in one piece
    logits_chunk: int = 2048
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts; `num_experts: 0` makes every layer dense."""

    num_experts: int = 0
    top_k: int = 2
    intermediate_size: int = 0
    num_shared_experts: int = 0
    layer_start: int = 1
    layer_end: int = -1  # -1: the last layer
    layer_interval: int = 1
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = 1.0  # capacity = ceil(factor * tokens * top_k / experts)
    # expert-parallel transport inside shard_map when mesh.expert > 1 (capacity semantics per
    # token shard); auto leaves the layout to XLA's SPMD partitioner
    transport: Literal["auto", "all_to_all", "allgather"] = "auto"
    norm_min: float = 1e-12
    aux_loss_weight: float = 1e-5
    z_loss_weight: float = 0.0
    orth_loss_weight: float = 0.0
    orth_mode: Literal["loss", "decoupled"] = "loss"  # decoupled: SGD step on the router after the optimizer
    group_orthogonal: bool = False
    bias_update_rate: float = 1e-3  # aux-loss-free correction-bias step; 0 freezes the bias
    # heterogeneous (VL) layers: a vision router + vision experts beside the text ones; 0 = none
    vision_num_experts: int = 0
    vision_intermediate_size: int = 0
    vision_top_k: int = 0  # 0: same as top_k
    vision_capacity_factor: float = 0.0  # 0: same as capacity_factor (both relative to all tokens)


@dataclass(frozen=True)
class PrecisionConfig:
    """FP8 matmuls: `experts` (ERNIE's choice: routed-expert GEMMs) or `all_linear` (every Linear
    except router, embeddings and LM head)."""

    fp8: Literal["off", "experts", "all_linear"] = "off"
    fp8_recipe: Literal["current", "blockwise", "delayed"] = "current"
    fp8_amax_history: int = 16  # delayed: steps of amax history per tensor


@dataclass(frozen=True)
class VisionConfig:
    """ViT encoder, adapter and the multimodal token ids (the VL model); disabled for text models.
    Defaults are ERNIE-4.5-VL's (config.json of baidu/ERNIE-4.5-VL-28B-A3B-PT on the HF hub)."""

    enabled: bool = False
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 5120
    patch_size: int = 14
    in_channels: int = 3
    spatial_merge: int = 2
    temporal_merge: int = 2
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_t_frequencies: int = 20  # LLM 3D RoPE: lowest-frequency pairs that rotate by t (freq_allocation)
    image_token_id: int = 100295
    image_start_token_id: int = 101304
    image_end_token_id: int = 101305
    video_token_id: int = 103367
    video_start_token_id: int = 101306
    video_end_token_id: int = 101307


@dataclass(frozen=True)
class DcnConfig:
    """How many of each mesh axis's shards lie across slices (TPU multi-slice: the data-centre network)
    or across nodes (GPU / CPU: one process each); the rest stay inside a slice (ICI / NVLink). Their
    product is the number of slices; all 1 = one slice (the flat mesh)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    pipeline: int = 1
    context: int = 1


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes (each the axis's total over all slices); -1 means 'the remaining devices'."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    pipeline: int = 1
    context: int = 1  # sequence shards (context parallelism); data.seq_len must divide by 2 x context
    dcn: DcnConfig = field(default_factory=DcnConfig)
    # expert parallelism keeps its all-to-alls inside a slice (ERNIE's intra-node EP) unless this is set
    allow_cross_slice_experts: bool = False


@dataclass(frozen=True)
class PipelineConfig:
    """Pipeline parallelism over `mesh.pipeline` stages (parallel/pipeline.py). The pipelined stack
    is the MoE units (dense models: all layers); leading dense layers, the last dense layers, the
    vision encoder, embeddings, head and MTP run outside it."""

    # 1f1b: the train step runs each microbatch's backward as soon as it leaves the last stage
    # (parallel/pipeline.py `one_f_one_b`; interleaved with repeats > 1); forward-only calls (eval)
    # run it as gpipe (circular with repeats > 1)
    schedule: Literal["gpipe", "circular", "1f1b"] = "gpipe"
    microbatches: int = 0  # per (accumulation) micro-batch; 0 = mesh.pipeline
    # circular / 1f1b: layer chunks per stage (each microbatch loops the stages this often)
    repeats: int = 1
    # 1f1b: what a stage keeps of a chunk until its backward: its input (the backward recomputes the
    # chunk's forward) or the forward's residuals (no recompute beyond model.remat; more memory)
    stash: Literal["inputs", "residuals"] = "inputs"


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.01
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 100
    decay_fraction: float = 0.1  # wsd: final fraction of steps spent in 1-sqrt decay
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off
    router_lr_ratio: float = 0.01
    grad_accum_steps: int = 1


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded"  # "embedded" or a path/glob of .txt/.jsonl/.array_record files
    tokenizer: str = "embedded"  # "embedded" or a directory holding tokenizer.model / tokenizer.json
    seq_len: int = 256
    batch_size: int = 8
    shuffle_seed: int = 0
    eval_fraction: float = 0.01
    # named held-out files scored at every eval as eval/<name>/loss, /ppl, /bpb: "name=path" or "path"
    # (name = the file's stem); text files for text / multimodal runs, chat JSONL for chat runs
    eval_source: tuple[str, ...] = ()
    max_doc_chars: int = 1_000_000
    # image-text data (multimodal JSONL, see ernie_jax/data/multimodal.py)
    kind: Literal["text", "multimodal", "chat", "preference", "prompts"] = "text"
    chat_mode: Literal["plain", "thinking", "no_thinking"] = "plain"  # chat / preference rendering
    max_patches: int = 4096  # ViT patches per global batch (fixed shape; rows share it equally)
    max_images_per_row: int = 16
    max_frames: int = 16  # video frames kept (uniformly sampled, even count)
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 28 * 28 * 1280
    image_min_side: int = 14  # smaller images are skipped and counted

    def eval_sources(self) -> list[tuple[str, str]]:
        """data.eval_source as (name, path): "name=path", or a path named by its file's stem."""
        out = []
        for entry in self.eval_source:
            name, sep, path = entry.partition("=")
            if not sep:
                path = entry
                name = path.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]
            out.append((name.strip(), path.strip()))
        return out


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 500
    keep: int = 3
    async_save: bool = True
    init_from: str = ""  # orbax or Hugging Face directory to start from


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    eval_interval: int = 200
    eval_steps: int = 10
    eval_at_start: bool = False  # also evaluate the starting params before the first step (a baseline)
    # parameter groups that get no updates and no optimizer state: vit, adapter, language_model
    # (embeddings, attention, norms, dense FFN, text router/experts, shared experts, head),
    # vision_experts (vision routers + experts)
    freeze: tuple[str, ...] = ()
    # VL: when a batch holds vision tokens, only ViT, adapter and vision experts learn from it
    modality_detach: bool = False
    # multimodal token-balanced LM loss: sum of text-token losses / all tokens in the batch
    token_balanced_loss: bool = False
    # a step with a non-finite loss / gradient is skipped (no update); this many in a row stop the run
    max_skipped_steps: int = 10
    # [first, last] (1-based, inclusive): a jax.profiler trace of those steps into <workdir>/profile/
    profile_steps: tuple[int, ...] = ()
    # a directory for JAX's persistent compilation cache: a rerun or resume skips recompiling
    compile_cache: str = ""


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation (data.kind=preference), after PaddlePaddle/ERNIE ernie/loss/dpo.py."""

    beta: float = 0.1
    # sigmoid (DPO), ipo, hinge, simpo (reference-free, length-averaged, margin simpo_gamma), dpop
    # (DPO-Positive: minus dpop_lambda x how far the chosen response fell below the reference)
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo", "dpop"] = "sigmoid"
    simpo_gamma: float = 0.5
    dpop_lambda: float = 50.0
    # score-based offset (ODPO): pairs with "chosen_score" > "rejected_score" must win by
    # offset_alpha x log(score gap); sigmoid loss only
    offset_alpha: float = 0.0
    reference_free: bool = False  # no reference model: its log-probs count as 0
    label_smoothing: float = 0.0
    normalize_logps: bool = True  # ERNIEKit: scale each side's log-prob sum to the pair's mean length
    pref_loss_ratio: float = 1.0
    sft_loss_ratio: float = 0.0  # + ratio * NLL of the chosen response
    # copy: a frozen copy of the starting policy runs beside it; cached: one pass over the data before
    # training stores the reference log-probs (workdir/reference_logps.npz), no second model in memory;
    # base (LoRA runs): the policy with its adapters switched off, no copy at all
    reference: Literal["copy", "cached", "base"] = "copy"


REWARD_BUILT_IN = ("exact", "numeric", "regex")


@dataclass(frozen=True)
class RLConfig:
    """On-policy RL on prompts (data.kind=prompts, trainers/rl.py): GRPO, or UPO = GRPO + a DPO term
    on each group's best vs worst answer (ERNIE 4.5's post-training recipe)."""

    algorithm: Literal["grpo", "upo"] = "upo"
    num_generations: int = 4  # answers sampled per prompt (one group)
    # prompts per rollout; prompts_per_step x num_generations = data.batch_size x grad_accum_steps
    prompts_per_step: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    clip_low: float = 0.2  # ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO's clip-higher)
    clip_high: float = 0.28
    kl_coef: float = 0.0  # x k3 estimate of KL(policy || reference)
    reference: Literal["copy", "base"] = "copy"  # base: LoRA runs, adapters switched off
    min_reward_std: float = 1e-6  # groups with a smaller reward std are dropped (no signal)
    ppo_epochs: int = 1  # optimiser steps per rollout
    upo_dpo_weight: float = 0.1
    upo_beta: float = 0.1
    # exact | numeric | regex | package.module:function (called on (prompts, completions, samples))
    reward: str = "exact"
    reward_tolerance: float = 0.0  # numeric: |answer - reference| allowed
    format_regex: str = ""  # regex: the answer must match; with format_weight: a bonus when it does
    format_weight: float = 0.0
    length_penalty: float = 0.0  # per answer token beyond length_target
    length_target: int = 0
    # held-out prompts for eval_accuracy ("" with data.source=embedded: the embedded held-out set)
    eval_source: str = ""


LORA_TARGETS = ("attention", "mlp", "shared_experts", "experts", "vision_experts", "vit", "adapter")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021): W x + scale * B(A(dropout(x))) on the targeted matmuls,
    the base frozen. ERNIEKit's settings: rank, alpha (2 x rank when 0), rsLoRA, LoRA+."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 0.0  # 0: 2 x rank (ERNIEKit's lora_alpha=-1)
    dropout: float = 0.0  # on each adapter's input, in training steps only
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank (Kalajdzievski 2023)
    lora_plus_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): B's learning rate = ratio x A's
    # named groups (LORA_TARGETS) or regular expressions matched against module paths such as
    # units/moe/self_attn/q_proj or units/moe/mlp/experts (re.search); each must match something.
    # Empty: every language-model group the model has (attention, mlp, shared_experts, experts)
    targets: tuple[str, ...] = ()
    # the frozen base's storage dtype (bfloat16 halves its memory; empty: model.param_dtype)
    base_dtype: str = ""
    # an adapter to start from: a PEFT directory (adapter_config.json) or an ernie_jax LoRA workdir
    init_from: str = ""
    # store the frozen base in checkpoints too (default: adapters only; resume re-reads the base
    # from checkpoint.init_from)
    save_base: bool = False


@dataclass(frozen=True)
class LogConfig:
    interval: int = 10
    tensorboard: bool = True
    # Weights & Biases (pip install -e '.[wandb]'): the project to log to; empty = off
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_run_name: str = ""  # empty: the workdir's name
    # prompts continued greedily at every eval, written to <workdir>/samples.jsonl and TensorBoard text
    # (a user turn of the chat format in chat / preference runs)
    sample_prompts: tuple[str, ...] = ()
    sample_max_new_tokens: int = 32


@dataclass(frozen=True)
class MixtureSource:
    """One data source of a stage's mixture; batches are drawn per step with probability ~ weight."""

    kind: Literal["text", "multimodal"] = "text"
    source: str = "embedded"
    weight: float = 1.0


@dataclass(frozen=True)
class StageConfig:
    """One pretraining stage: its own steps, overrides of the base config (`set`: dotted key=value,
    e.g. data.seq_len, model.rope_theta, optimizer.*, train.freeze, vision.enabled), data mixture, and
    whether the optimizer state of the previous stage is kept (same model and trainable set only)."""

    name: str = "stage"
    steps: int = 100
    set: tuple[str, ...] = ()
    mixture: tuple[MixtureSource, ...] = ()
    optimizer_state: Literal["reset", "keep"] = "reset"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    log: LogConfig = field(default_factory=LogConfig)
    stages: tuple[StageConfig, ...] = ()  # multi-stage pretraining (trainers/stages.py); empty: one run


# ----------------------------------------------------------------------------- dicts and overrides


def from_dict(raw: dict) -> Config:
    """Build a Config from a nested dict, rejecting unknown keys and wrong types."""
    return _build(Config, raw, prefix="")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=100)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is a value, not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        typ, value, dotted = hints[name], raw[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, dotted + ".")
        else:
            kwargs[name] = _coerce(typ, value, dotted)
    return cls(**kwargs)


def _coerce(typ: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if isinstance(value, bool) and ("off" if not value else "on") in choices:
            value = "off" if not value else "on"  # YAML 1.1 reads a bare off/on as a boolean
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not allowed; use one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {typ}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        (arg, *_) = typing.get_args(typ) or (Any,)
        if dataclasses.is_dataclass(arg):
            return tuple(_build(arg, v, f"{key}[{i}].") for i, v in enumerate(value))
        return tuple(_coerce(arg, v, key) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    return value


FREEZE_GROUPS = ("vit", "adapter", "language_model", "vision_experts")


# Fields whose change alters parameter shapes: a checkpoint of another value is another model.
SHAPE_FIELDS = {
    "model": (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "intermediate_size",
        "tie_word_embeddings",
        "mtp_depth",
    ),
    "moe": (
        "num_experts",
        "intermediate_size",
        "num_shared_experts",
        "layer_start",
        "layer_end",
        "layer_interval",
    ),
}


# parts a run started from another run may leave out (SFT switches MTP off, as ERNIE does)
DROPPABLE = (("model", "mtp_depth"),)


def _shape_fields(d: dict) -> dict:
    out = {(s, f): d.get(s, {}).get(f) for s, fields in SHAPE_FIELDS.items() for f in fields}
    if out[("moe", "layer_end")] == -1 and out[("model", "num_layers")] is not None:
        out[("moe", "layer_end")] = out[("model", "num_layers")] - 1
    return out


def shape_difference(old: dict, new: dict, droppable: tuple = ()) -> tuple[str, object, object] | None:
    """The first parameter-shape field (key, old value, new value) that differs between two config
    dicts, ignoring `droppable` fields set to 0 in `new`; None when params carry over."""
    old_fields, new_fields = _shape_fields(old), _shape_fields(new)
    for (section, f), was in old_fields.items():
        now = new_fields[(section, f)]
        if (section, f) in droppable and now == 0:
            continue
        if was is not None and was != now:
            return f"{section}.{f}", was, now
    return None


def is_moe_layer(i: int, num_layers: int, moe: MoEConfig) -> bool:
    """ERNIE placement rule: layer i is MoE iff (i+1) % interval == 0 and start <= i <= end."""
    if moe.num_experts == 0:
        return False
    end = num_layers - 1 if moe.layer_end == -1 else moe.layer_end
    return (i + 1) % moe.layer_interval == 0 and moe.layer_start <= i <= end


@dataclass(frozen=True)
class LayerPlan:
    """Counts of the three stacks; `locate(i)` -> (stack, unit, slot) for global layer i."""

    num_prefix: int
    num_units: int
    dense_per_unit: int
    num_suffix: int

    @classmethod
    def of(cls, model: ModelConfig, moe: MoEConfig) -> LayerPlan:
        """The decoder's stacks (model/ernie.py): dense prefix, units of dense layers + one MoE
        layer, dense suffix."""
        n = model.num_layers
        moe_ids = [i for i in range(n) if is_moe_layer(i, n, moe)]
        if not moe_ids:
            return cls(n, 0, 0, 0)
        interval = moe.layer_interval
        first = moe_ids[0] - (interval - 1)
        return cls(first, len(moe_ids), interval - 1, n - 1 - moe_ids[-1])

    @property
    def num_moe(self) -> int:
        return self.num_units

    @property
    def pipelined_stack(self) -> str:
        return pipelined_stack(self.num_units > 0)

    @property
    def pipelined_depth(self) -> int:
        """How many entries the pipelined stack has (what the pipeline stages split)."""
        return self.num_units if self.num_units else self.num_prefix

    def locate(self, i: int) -> tuple[str, int, int]:
        """('prefix', j, -1) | ('units', u, slot) with slot == dense_per_unit for MoE | ('suffix', j, -1)."""
        if i < self.num_prefix:
            return ("prefix", i, -1)
        i -= self.num_prefix
        per = self.dense_per_unit + 1
        if i < self.num_units * per:
            return ("units", i // per, i % per)
        return ("suffix", i - self.num_units * per, -1)


def pipelined_stack(has_units: bool) -> str:
    """The one rule for which stack pipeline parallelism splits into stages: the MoE units when the
    model has any, else (a dense model) the dense layers, which all sit in the prefix."""
    return "units" if has_units else "prefix"


def layer_plan(cfg: Config) -> LayerPlan:
    """`LayerPlan.of` the config's model and MoE settings."""
    return LayerPlan.of(cfg.model, cfg.moe)
