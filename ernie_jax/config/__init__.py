"""One config tree: typed, frozen dataclasses (`schema`), cross-field checks (`checks`), YAML loading
with `base:` inheritance and `--set a.b=c` overrides (`load`). Every user mistake fails at load time
with one line naming the key."""
from ernie_jax.config.checks import check_config, check_same_model, stage_config, validate
from ernie_jax.config.load import load_config
from ernie_jax.config.schema import (DROPPABLE, FREEZE_GROUPS, SHAPE_FIELDS, CheckpointConfig, Config, DataConfig,
                                     DPOConfig, LayerPlan, LogConfig, MeshConfig, MixtureSource, ModelConfig,
                                     MoEConfig, OptimizerConfig, PipelineConfig, PrecisionConfig, StageConfig,
                                     TrainConfig, VisionConfig, from_dict, is_moe_layer, layer_plan, pipelined_stack,
                                     shape_difference, to_dict, to_json)

__all__ = ["check_config", "check_same_model", "stage_config", "validate", "load_config", "DROPPABLE",
           "FREEZE_GROUPS", "SHAPE_FIELDS", "CheckpointConfig", "Config", "DataConfig", "DPOConfig", "LayerPlan",
           "LogConfig", "MeshConfig", "MixtureSource", "ModelConfig", "MoEConfig", "OptimizerConfig",
           "PipelineConfig", "PrecisionConfig", "StageConfig", "TrainConfig", "VisionConfig", "from_dict",
           "is_moe_layer", "layer_plan", "pipelined_stack", "shape_difference", "to_dict", "to_json"]
