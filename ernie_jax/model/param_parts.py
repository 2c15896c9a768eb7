"""What each parameter is, from its path in the model's param tree: the one classification that the
optimizer groups, `train.freeze`, `modality_detach`, the post-step router rules and the parameter
summary all read, so a renamed module changes one place.

    param_part(("units", "moe", "mlp", "gate", "kernel"))
    -> ParamPart(component="router", freeze_group="language_model", optimizer_group="router")
"""

from __future__ import annotations

import dataclasses

# the summary's components (summary.py prints them in this order)
COMPONENTS = (
    "embedding",
    "lm_head",
    "attention",
    "dense_ffn",
    "routed_experts",
    "shared_experts",
    "router",
    "norms",
    "vision_experts",
    "vision_router",
    "vit",
    "adapter",
    "mtp",
)
# the routers of a MoE block (text, vision) and where the stacked MoE blocks keep them
ROUTERS = ("gate", "vision_gate")
ROUTER_PATH = ("units", "moe", "mlp")


@dataclasses.dataclass(frozen=True)
class ParamPart:
    component: str  # one of COMPONENTS
    freeze_group: str  # vit | adapter | vision_experts | language_model (config FREEZE_GROUPS)
    # router (LR x router_lr_ratio) | no_decay (norms, biases) | lora_b (LR x lora_plus_ratio) | decay
    optimizer_group: str


def _names(path) -> list[str]:
    return [str(getattr(p, "key", p)) for p in path]


def param_part(path) -> ParamPart:
    """The part of the model the param at `path` (strings or jax key entries) belongs to."""
    names = _names(path)
    return ParamPart(_component(names), _freeze_group(names), _optimizer_group(names))


def _freeze_group(names: list[str]) -> str:
    if names[0] == "vision_model":
        return "vit"
    if names[0] == "resampler":
        return "adapter"
    if "vision_gate" in names or "vision_experts" in names:
        return "vision_experts"
    return "language_model"


def _optimizer_group(names: list[str]) -> str:
    if len(names) >= 2 and names[-2].endswith("lora") and names[-1] == "b":
        return "lora_b"
    if len(names) >= 2 and names[-2] in ("gate", "vision_gate") and names[-1] == "kernel":
        return "router"
    if names[-1] == "bias" or (
        names[-1] == "weight" and any(n.endswith("norm") or n.startswith("norm") or n == "ln" for n in names)
    ):
        return "no_decay"
    return "decay"


def _component(names: list[str]) -> str:
    if names[0] == "mtp":
        return "mtp"
    if names[0] == "vision_model":
        return "vit"
    if names[0] == "resampler":
        return "adapter"
    if "vision_experts" in names:
        return "vision_experts"
    if "vision_gate" in names and names[-1] == "kernel":
        return "vision_router"
    if names[0] in ("embed_tokens", "lm_head"):
        return "embedding" if names[0] == "embed_tokens" else "lm_head"
    if "self_attn" in names:
        return "attention"
    if "experts" in names:
        return "routed_experts"
    if "shared_experts" in names:
        return "shared_experts"
    if (
        "gate" in names
        and names[-1] == "kernel"
        and "mlp" in names
        and names[names.index("mlp") + 1] == "gate"
    ):
        return "router"
    if any(n.endswith("norm") or n.endswith("layernorm") for n in names):
        return "norms"
    return "dense_ffn"
