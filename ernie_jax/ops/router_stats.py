"""The router statistics a MoE block returns, and the one place their naming lives.

Each expert group (text, and vision in VL layers) reports, per layer, its three losses and three
counts under `<group prefix><name>`: `aux_loss`, `z_loss`, `orth_loss`, `expert_load` [E],
`dropped`, `assignments`, e.g. `vision_z_loss`. The prefixes are the metric names users see, so
they stay flat strings; every reader goes through the helpers here instead of matching suffixes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUPS = ("text", "vision")
PREFIX = {"text": "", "vision": "vision_"}
LOSSES = ("aux_loss", "z_loss", "orth_loss")
COUNTS = ("expert_load", "dropped", "assignments")


def named(group: str, values: dict) -> dict:
    """One group's statistics under their flat names."""
    return {PREFIX[group] + k: v for k, v in values.items()}


def is_loss(key: str) -> bool:
    """Losses are averaged over microbatches; counts are summed."""
    return any(key == PREFIX[g] + name for g in GROUPS for name in LOSSES)


def _present(stats: dict) -> list[str]:
    return [g for g in GROUPS if PREFIX[g] + "assignments" in stats]


def summarise(stats: dict | None):
    """Per-layer stats [L_moe, ...] -> (losses summed over layers, text expert load [L_moe, E],
    fraction of assignments dropped over all groups); zero losses and no load without MoE layers."""
    if not stats:
        zero = jnp.zeros((), jnp.float32)
        return {name: zero for name in LOSSES}, None, None
    groups = _present(stats)
    losses = {PREFIX[g] + name: jnp.sum(stats[PREFIX[g] + name]) for g in groups for name in LOSSES}
    dropped = sum(jnp.sum(stats[PREFIX[g] + "dropped"]) for g in groups)
    assignments = sum(jnp.sum(stats[PREFIX[g] + "assignments"]) for g in groups)
    return losses, stats["expert_load"], dropped / jnp.maximum(assignments, 1.0)


def weighted_total(losses: dict, aux_weight: float, z_weight: float, orth_weight: float | None) -> jax.Array:
    """sum over groups of aux_weight * L_aux + z_weight * L_z (+ orth_weight * L_orth when the
    orthogonal loss is a loss term); every group has the same weights (PaddlePaddle/ERNIE
    ernie/moe/topk_gate.py)."""
    total = 0.0
    for g in GROUPS:
        p = PREFIX[g]
        if p + "aux_loss" not in losses:
            continue
        total = total + aux_weight * losses[p + "aux_loss"] + z_weight * losses[p + "z_loss"]
        if orth_weight is not None:
            total = total + orth_weight * losses[p + "orth_loss"]
    return total
