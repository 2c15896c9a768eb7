"""Cross-field config checks: each failure is one line that names the key and how to fix it."""

from __future__ import annotations

import dataclasses

import re

from ernie_jax.config.schema import (
    DROPPABLE,
    FREEZE_GROUPS,
    LORA_TARGETS,
    REWARD_BUILT_IN,
    Config,
    LoraConfig,
    StageConfig,
    _apply_override,
    from_dict,
    is_moe_layer,
    layer_plan,
    shape_difference,
    to_dict,
)
from ernie_jax.errors import CheckpointError, ConfigError
from ernie_jax.precision.remat import CHECKPOINT_NAMES


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check_config(cfg: Config) -> None:
    """Cross-field checks; each failure names the key and how to fix it."""
    m, e = cfg.model, cfg.moe
    for name in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "intermediate_size",
    ):
        _require(getattr(m, name) > 0, f"model.{name}={getattr(m, name)} must be positive")
    _require(
        m.num_heads % m.num_kv_heads == 0,
        f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads} (GQA groups)",
    )
    _require(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs)")
    _require(m.mtp_depth >= 0, f"model.mtp_depth={m.mtp_depth} must be >= 0")
    _require(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be positive")
    for n in m.remat_names:
        _require(
            n in CHECKPOINT_NAMES,
            f"model.remat_names: {n!r} is not a checkpoint name; use {CHECKPOINT_NAMES}",
        )
    _require(
        m.remat != "named" or m.remat_names,
        "model.remat=named needs model.remat_names (e.g. [qkv, attn_out])",
    )
    if e.num_experts:
        _require(e.num_experts > 0, f"moe.num_experts={e.num_experts} must be >= 0 (0 = dense model)")
        _require(
            1 <= e.top_k <= e.num_experts,
            f"moe.top_k={e.top_k} must be between 1 and moe.num_experts={e.num_experts}",
        )
        _require(e.intermediate_size > 0, "moe.intermediate_size must be set (> 0) when moe.num_experts > 0")
        _require(e.num_shared_experts >= 0, "moe.num_shared_experts must be >= 0")
        _require(e.layer_interval >= 1, f"moe.layer_interval={e.layer_interval} must be >= 1")
        end = m.num_layers - 1 if e.layer_end == -1 else e.layer_end
        _require(
            0 <= e.layer_start < m.num_layers,
            f"moe.layer_start={e.layer_start} must be in [0, model.num_layers={m.num_layers})",
        )
        _require(
            e.layer_start <= end < m.num_layers,
            f"moe.layer_end={e.layer_end} must be -1 or in [moe.layer_start, model.num_layers)",
        )
        _require(
            any(is_moe_layer(i, m.num_layers, e) for i in range(m.num_layers)),
            "moe.layer_start/layer_end/layer_interval select no MoE layer; widen the range",
        )
        _require(e.capacity_factor > 0, f"moe.capacity_factor={e.capacity_factor} must be > 0")
        if e.group_orthogonal:
            _require(
                e.num_experts % e.top_k == 0,
                f"moe.group_orthogonal needs moe.top_k={e.top_k} to divide moe.num_experts={e.num_experts}",
            )
    if e.vision_num_experts:
        _require(e.num_experts > 0, "moe.vision_num_experts needs text experts too (moe.num_experts > 0)")
        _require(
            e.vision_intermediate_size > 0,
            "moe.vision_intermediate_size must be set (> 0) when moe.vision_num_experts > 0",
        )
        vk = e.vision_top_k or e.top_k
        _require(
            1 <= vk <= e.vision_num_experts,
            f"moe.vision_top_k={vk} must be between 1 and moe.vision_num_experts={e.vision_num_experts}",
        )
        _require(
            e.vision_capacity_factor >= 0, "moe.vision_capacity_factor must be >= 0 (0 = moe.capacity_factor)"
        )
    v = cfg.vision
    if v.enabled:
        _require(
            v.hidden_size % v.num_heads == 0,
            f"vision.num_heads={v.num_heads} must divide vision.hidden_size={v.hidden_size}",
        )
        _require(
            (v.hidden_size // v.num_heads) % 4 == 0,
            "vision head dim (vision.hidden_size / vision.num_heads) must be a multiple of 4 (2D RoPE)",
        )
        _require(v.temporal_merge == 2, "vision.temporal_merge must be 2 (the adapter pairs frames)")
        _require(
            0 <= v.rope_t_frequencies <= m.head_dim // 2
            and (m.head_dim // 2 - v.rope_t_frequencies) % 2 == 0,
            f"vision.rope_t_frequencies={v.rope_t_frequencies} must leave an even number of the "
            f"{m.head_dim // 2} RoPE frequencies for h/w",
        )
        _require(e.vision_num_experts > 0, "vision.enabled needs vision experts: set moe.vision_num_experts")
        for name in (
            "image_token_id",
            "image_start_token_id",
            "image_end_token_id",
            "video_token_id",
            "video_start_token_id",
            "video_end_token_id",
        ):
            _require(
                0 <= getattr(v, name) < m.vocab_size,
                f"vision.{name}={getattr(v, name)} is outside the vocabulary "
                f"(model.vocab_size={m.vocab_size}); "
                f"set it to an id below {m.vocab_size} or raise model.vocab_size",
            )
    if cfg.precision.fp8 != "off" and cfg.precision.fp8_recipe == "delayed":
        _require(cfg.precision.fp8_amax_history >= 1, "precision.fp8_amax_history must be >= 1")
    for name in cfg.train.freeze:
        _require(
            name in FREEZE_GROUPS, f"train.freeze: {name!r} is not a parameter group; use {FREEZE_GROUPS}"
        )
        _require(
            name not in ("vit", "adapter") or cfg.vision.enabled,
            f"train.freeze: {name!r} matches nothing in a text model (vision.enabled=false); remove it",
        )
        _require(
            name != "vision_experts" or e.vision_num_experts > 0,
            "train.freeze: 'vision_experts' matches nothing (moe.vision_num_experts=0); remove it",
        )
    _check_dcn(cfg)
    _check_lora(cfg)
    _check_dpo(cfg)
    _check_rl(cfg)
    o = cfg.optimizer
    _require(o.grad_accum_steps >= 1, f"optimizer.grad_accum_steps={o.grad_accum_steps} must be >= 1")
    _require(0 <= o.decay_fraction <= 1, f"optimizer.decay_fraction={o.decay_fraction} must be in [0, 1]")
    _require(o.learning_rate >= 0, "optimizer.learning_rate must be >= 0")
    _require(o.clip_norm >= 0, f"optimizer.clip_norm={o.clip_norm} must be >= 0 (0 turns clipping off)")
    d = cfg.data
    _require(d.seq_len >= 2, f"data.seq_len={d.seq_len} must be >= 2")
    _require(d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1")
    _require(
        0 <= d.eval_fraction < 1,
        f"data.eval_fraction={d.eval_fraction} must be in [0, 1) (the share of "
        f"samples held out for eval; 0 turns eval off)",
    )
    sources = d.eval_sources()
    for name, path in sources:
        _require(
            re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name) is not None and bool(path),
            f"data.eval_source entry {name}={path!r} needs a plain name and a path, e.g. "
            f"data.eval_source=[heldout=data/val.txt]",
        )
    names = [n for n, _ in sources]
    _require(
        len(set(names)) == len(names),
        f"data.eval_source names must be unique, got {names}; name them, e.g. [a=x/val.txt, b=y/val.txt]",
    )
    _require(
        not sources or d.kind != "preference",
        "data.eval_source scores text or chat files; a DPO run (data.kind=preference) reports its "
        "held-out pairs (data.eval_fraction): remove data.eval_source",
    )
    _require(
        cfg.log.sample_max_new_tokens >= 1,
        f"log.sample_max_new_tokens={cfg.log.sample_max_new_tokens} must be >= 1",
    )
    _require(
        all(p.strip() for p in cfg.log.sample_prompts),
        "log.sample_prompts holds an empty prompt; remove it or give it some text",
    )
    _require(cfg.train.eval_interval >= 1, f"train.eval_interval={cfg.train.eval_interval} must be >= 1")
    _require(
        cfg.train.eval_steps >= 1,
        f"train.eval_steps={cfg.train.eval_steps} must be >= 1 (set data.eval_fraction=0 to turn eval off)",
    )
    _require(
        d.seq_len <= m.max_position_embeddings,
        f"data.seq_len={d.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}",
    )
    _require(cfg.dpo.beta > 0, f"dpo.beta={cfg.dpo.beta} must be > 0")
    _require(0 <= cfg.dpo.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)")
    if d.kind == "multimodal":
        _require(
            cfg.vision.enabled,
            "data.kind=multimodal needs a VL model: set vision.enabled=true (e.g. configs/tiny_vl.yaml)",
        )
        _require(
            d.max_frames >= 2, f"data.max_frames={d.max_frames} must be >= 2 (frames are merged in pairs)"
        )
        _require(
            0 < d.image_min_pixels <= d.image_max_pixels,
            "data.image_min_pixels must be positive and <= data.image_max_pixels",
        )
    _require(cfg.train.steps >= 0, "train.steps must be >= 0")
    _require(cfg.checkpoint.interval >= 1, "checkpoint.interval must be >= 1")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep must be >= 1")
    _require(cfg.log.interval >= 1, "log.interval must be >= 1")
    _require(
        cfg.train.max_skipped_steps >= 1,
        f"train.max_skipped_steps={cfg.train.max_skipped_steps} must be >= 1 "
        f"(non-finite steps in a row that stop the run)",
    )
    prof = cfg.train.profile_steps
    _require(
        not prof or (len(prof) == 2 and 1 <= prof[0] <= prof[1]),
        f"train.profile_steps={list(prof)} must be [first, last] with 1 <= first <= last, e.g. [10, 12]",
    )
    names = [st.name for st in cfg.stages]
    for name in names:  # a stage's name is a directory under the workdir: no separators, no '..'
        _require(
            re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) is not None and ".." not in name,
            f"stages: name {name!r} must be a plain identifier (letters, digits, '_', '-', '.'; no '/' "
            f"or '..'), e.g. long_text",
        )
    _require(len(set(names)) == len(names), f"stages: names must be unique, got {names}")
    resolved = []
    for st in cfg.stages:
        _require(st.steps >= 1, f"stages[{st.name}].steps={st.steps} must be >= 1")
        for src in st.mixture:
            _require(src.weight > 0, f"stages[{st.name}].mixture: weights must be > 0")
        resolved.append(to_dict(stage_config(cfg, st)))  # each stage's config must be valid on its own
    for k in range(1, len(resolved)):
        # a stage starts from the previous stage's params: their shapes must carry over (new parts such
        # as the vision tower may be switched on); found here, not after the previous stage trained
        diff = shape_difference(resolved[k - 1], resolved[k], DROPPABLE)
        if diff is not None:
            key, old, new = diff
            prev, st = cfg.stages[k - 1].name, cfg.stages[k].name
            raise ConfigError(
                f"stages[{st}] has {key}={new} but stage {prev} before it has {key}={old}: a stage "
                f"starts from the previous stage's params, so keep {key}={old} in both"
            )
    for axis in ("data", "fsdp", "context", "tensor", "expert", "pipeline"):
        size = getattr(cfg.mesh, axis)
        _require(size == -1 or size >= 1, f"mesh.{axis}={size} must be -1 (the rest) or >= 1")
    _validate_long_context(cfg)
    _validate_pipeline(cfg)


def _validate_long_context(cfg: Config) -> None:
    m, c = cfg.model, cfg.mesh.context
    _require(c != -1, "mesh.context=-1 is not allowed: give the number of context shards explicitly")
    _require(
        cfg.data.seq_len % (2 * c) == 0 or c == 1,
        f"data.seq_len={cfg.data.seq_len} is not divisible by 2 x mesh.context = {2 * c} (each context "
        f"shard holds two equal chunks of the sequence); change data.seq_len or mesh.context",
    )
    for name in ("attention_block_q", "attention_block_kv", "logits_chunk"):
        _require(getattr(m, name) >= 0, f"model.{name}={getattr(m, name)} must be >= 0 (0: the default)")
    if m.attention == "splash":
        for name in ("attention_block_q", "attention_block_kv"):
            _require(
                getattr(m, name) % 128 == 0,
                f"model.{name}={getattr(m, name)} must be a multiple of 128 for splash (TPU lanes)",
            )


def _validate_pipeline(cfg: Config) -> None:
    pp, stages = cfg.pipeline, cfg.mesh.pipeline
    _require(stages != -1, "mesh.pipeline=-1 is not allowed: give the number of pipeline stages explicitly")
    _require(pp.repeats >= 1, f"pipeline.repeats={pp.repeats} must be >= 1")
    _require(
        pp.microbatches >= 0, f"pipeline.microbatches={pp.microbatches} must be >= 0 (0 = mesh.pipeline)"
    )
    _require(
        pp.schedule != "gpipe" or pp.repeats == 1,
        f"pipeline.repeats={pp.repeats} needs pipeline.schedule=circular or 1f1b (gpipe runs a stage once)",
    )
    if stages == 1:
        return
    micro = pp.microbatches or stages
    _require(
        pp.schedule != "circular" or micro >= stages,
        f"pipeline.microbatches={micro} must be >= mesh.pipeline={stages} for the circular schedule "
        f"(a microbatch must leave the last stage before it re-enters the first)",
    )
    _require(
        pp.schedule != "1f1b" or micro >= stages,
        f"pipeline.microbatches={micro} must be >= mesh.pipeline={stages} for 1f1b (with fewer, stages wait "
        f"idle; use gpipe or more microbatches)",
    )
    _require(
        pp.schedule != "1f1b" or pp.repeats == 1 or micro % stages == 0,
        f"pipeline.microbatches={micro} must be a multiple of mesh.pipeline={stages} for interleaved 1f1b "
        f"(pipeline.repeats={pp.repeats}: microbatches go round the stages in groups of {stages})",
    )
    _require(
        pp.schedule == "1f1b" or pp.stash == "inputs",
        f"pipeline.stash={pp.stash} is what 1f1b keeps between a chunk's forward and backward; "
        f"set pipeline.schedule=1f1b or leave pipeline.stash at inputs",
    )
    _require(
        pp.schedule != "1f1b" or cfg.data.kind not in ("preference", "prompts"),
        f"pipeline.schedule=1f1b scores each microbatch on its own, which splits the pairs / groups of "
        f"data.kind={cfg.data.kind}; use pipeline.schedule=gpipe",
    )
    _require(
        pp.schedule != "1f1b" or not cfg.vision.enabled,
        "pipeline.schedule=1f1b runs text models for now (the ViT sits before the stack); use gpipe",
    )
    plan = layer_plan(cfg)
    size, what = plan.pipelined_depth, ("MoE units" if plan.pipelined_stack == "units" else "layers")
    _require(
        size >= stages * pp.repeats,
        f"the {size} pipelined {what} are fewer than mesh.pipeline x pipeline.repeats = "
        f"{stages} x {pp.repeats} chunks; use fewer stages or repeats",
    )
    _require(
        cfg.data.batch_size % micro == 0,
        f"data.batch_size={cfg.data.batch_size} is not divisible by pipeline.microbatches={micro}",
    )
    _require(
        cfg.precision.fp8 == "off" or cfg.precision.fp8_recipe != "delayed",
        "precision.fp8_recipe=delayed does not run under pipeline parallelism yet; use current or blockwise",
    )


def _check_dcn(cfg: Config) -> None:
    """The across-slice sizes on their own (their fit to the job's slices is checked with the devices)."""
    m = cfg.mesh
    for axis in (f.name for f in dataclasses.fields(m.dcn)):
        v, total = getattr(m.dcn, axis), getattr(m, axis)
        _require(v >= 1, f"mesh.dcn.{axis}={v} must be >= 1 (1 = inside a slice)")
        _require(
            total == -1 or total % v == 0,
            f"mesh.dcn.{axis}={v} does not divide mesh.{axis}={total} (the axis's total over all slices); "
            f"make mesh.{axis} a multiple of it",
        )
    _require(
        m.dcn.expert == 1 or m.allow_cross_slice_experts,
        f"mesh.dcn.expert={m.dcn.expert} puts expert all-to-alls on the slow network between slices; keep "
        f"expert parallelism inside a slice (mesh.dcn.expert=1) or set mesh.allow_cross_slice_experts=true",
    )


def _check_dpo(cfg: Config) -> None:
    d = cfg.dpo
    _require(d.beta > 0, f"dpo.beta={d.beta} must be > 0")
    _require(
        d.offset_alpha == 0 or d.loss_type == "sigmoid",
        f"dpo.offset_alpha={d.offset_alpha} (score-based offset) works with dpo.loss_type=sigmoid only",
    )
    _require(d.offset_alpha >= 0, f"dpo.offset_alpha={d.offset_alpha} must be >= 0")
    _require(d.dpop_lambda >= 0, f"dpo.dpop_lambda={d.dpop_lambda} must be >= 0")


def _check_lora(cfg: Config) -> None:
    lo = cfg.lora
    _require(
        lo.enabled or cfg.dpo.reference != "base",
        "dpo.reference=base needs adapters (lora.enabled=true); use copy or cached",
    )
    if not lo.enabled:
        return
    _require(lo.rank > 0, f"lora.rank={lo.rank} must be > 0 (e.g. 8, 16, 32)")
    _require(lo.alpha >= 0, f"lora.alpha={lo.alpha} must be >= 0 (0: 2 x lora.rank)")
    _require(0 <= lo.dropout < 1, f"lora.dropout={lo.dropout} must be in [0, 1)")
    _require(
        not lo.dropout or cfg.precision.fp8 == "off" or cfg.precision.fp8_recipe != "delayed",
        "lora.dropout with precision.fp8_recipe=delayed is not supported; use fp8_recipe=current or "
        "lora.dropout=0",
    )
    _require(lo.lora_plus_ratio > 0, f"lora.lora_plus_ratio={lo.lora_plus_ratio} must be > 0 (1: plain LoRA)")
    _require(
        lo.base_dtype in ("", "bfloat16", "float32"),
        f"lora.base_dtype={lo.base_dtype!r} must be bfloat16, float32 or empty (model.param_dtype)",
    )
    for t in lo.targets:
        if t in LORA_TARGETS:
            continue
        try:
            re.compile(t)
        except re.error as err:
            raise ConfigError(
                f"lora.targets: {t!r} is neither a group {LORA_TARGETS} nor a valid pattern ({err})"
            ) from None


def _check_rl(cfg: Config) -> None:
    rl, d = cfg.rl, cfg.data
    if d.kind != "prompts":
        return
    g = rl.num_generations
    _require(g >= 2, f"rl.num_generations={g}: group-relative advantages need >= 2 answers per prompt")
    _require(rl.prompts_per_step >= 1, f"rl.prompts_per_step={rl.prompts_per_step} must be >= 1")
    rows = d.batch_size * cfg.optimizer.grad_accum_steps
    _require(
        rl.prompts_per_step * g == rows,
        f"rl.prompts_per_step x rl.num_generations = {rl.prompts_per_step * g} answers per rollout, but "
        f"a step takes data.batch_size x optimizer.grad_accum_steps = {rows} rows; make them equal",
    )
    _require(
        d.batch_size % g == 0,
        f"data.batch_size={d.batch_size} must be a multiple of rl.num_generations={g} (a micro-batch holds "
        f"whole groups)",
    )
    _require(
        1 <= rl.max_new_tokens < d.seq_len,
        f"rl.max_new_tokens={rl.max_new_tokens} must be in [1, data.seq_len={d.seq_len})",
    )
    _require(
        rl.temperature > 0, f"rl.temperature={rl.temperature} must be > 0 (greedy samples are all alike)"
    )
    _require(0 < rl.top_p <= 1, f"rl.top_p={rl.top_p} must be in (0, 1]")
    _require(
        0 <= rl.clip_low < 1 and rl.clip_high >= 0, "rl.clip_low must be in [0, 1) and rl.clip_high >= 0"
    )
    _require(rl.kl_coef >= 0, f"rl.kl_coef={rl.kl_coef} must be >= 0")
    _require(rl.ppo_epochs >= 1, f"rl.ppo_epochs={rl.ppo_epochs} must be >= 1")
    _require(
        rl.reference != "base" or cfg.lora.enabled,
        "rl.reference=base needs adapters (lora.enabled=true); use rl.reference=copy",
    )
    _require(
        rl.reward in REWARD_BUILT_IN or re.fullmatch(r"[\w.]+:\w+", rl.reward) is not None,
        f"rl.reward={rl.reward!r}: use one of {REWARD_BUILT_IN} or 'package.module:function'",
    )
    _require(
        rl.reward != "regex" or bool(rl.format_regex),
        "rl.reward=regex needs rl.format_regex (the pattern an answer must match)",
    )
    merge2 = cfg.vision.spatial_merge**2
    _require(
        not cfg.vision.enabled or (d.max_patches % (d.batch_size * merge2) == 0 and d.max_patches > 0),
        f"data.max_patches={d.max_patches} must be a positive multiple of data.batch_size x {merge2} (each "
        f"row's share of a micro-batch's patches, in whole 2x2 windows)",
    )


def lora_difference(saved: dict, cfg: Config) -> str | None:
    """Why a checkpoint cannot resume under `cfg`'s adapters (other rank, targets, on/off), or None."""
    old, new = saved.get("lora", {}), to_dict(cfg)["lora"]
    for key in ("enabled", "rank", "targets"):
        was, now = old.get(key, LoraConfig.__dataclass_fields__[key].default), new[key]
        was, now = (tuple(v) if isinstance(v, list) else v for v in (was, now))
        if now != was:
            return f"lora.{key}={was!r} in the checkpoint but {now!r} in the config"
    return None


def validate(cfg: Config) -> None:
    """Cross-field checks; each failure names the key and the fix."""
    check_config(cfg)


def stage_config(cfg: Config, stage: StageConfig) -> Config:
    """The config one stage runs with: the base config, the stage's overrides, its steps; no stages."""
    raw = to_dict(cfg)
    raw["stages"] = []
    raw["train"]["steps"] = stage.steps
    for item in stage.set:
        try:
            _apply_override(raw, item)
        except ConfigError as e:
            raise ConfigError(f"stages[{stage.name}].set: {e}") from None
    try:
        out = from_dict(raw)
        validate(out)
    except ConfigError as e:
        raise ConfigError(f"stages[{stage.name}]: {e}") from None
    return out


def check_same_model(
    saved: dict, cfg: Config, where: str, fix: str = "use another --workdir", droppable: tuple = ()
) -> None:
    """A checkpoint whose parameter shapes differ from the config is refused before any compute.
    `droppable`: (section, field) pairs the target may set to 0 (a part it does not have, e.g. the
    MTP layers when SFT starts from a pretraining run)."""
    diff = shape_difference(saved, to_dict(cfg), droppable)
    if diff is not None:
        key, old, new = diff
        raise CheckpointError(
            f"{where} holds a checkpoint with {key}={old}, but the config says {new}; "
            f"{fix} or set {key}={old}"
        )
