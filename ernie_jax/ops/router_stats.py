"""The router statistics a MoE block returns: one typed `GroupStats` per expert group (text, and
vision in VL layers), stacked over layers by the layer scan, and the one place where they become
the flat metric names users see (`aux_loss`, `vision_z_loss`, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

GROUPS = ("text", "vision")
PREFIX = {"text": "", "vision": "vision_"}  # metric names: `<prefix><field>`, e.g. vision_z_loss
LOSSES = ("aux_loss", "z_loss", "orth_loss")


@struct.dataclass
class GroupStats:
    """One expert group's statistics of one MoE layer ([L, ...] once the layer scan stacks them):
    three losses (averaged over microbatches) and three counts (summed)."""

    aux_loss: jax.Array
    z_loss: jax.Array
    orth_loss: jax.Array
    expert_load: jax.Array  # [E] tokens routed to each expert
    dropped: jax.Array  # assignments past an expert's capacity
    assignments: jax.Array  # tokens x top-k

    def losses_over(self, microbatches) -> GroupStats:
        """Losses summed over microbatches -> their mean (counts stay sums)."""
        return self.replace(
            aux_loss=self.aux_loss / microbatches,
            z_loss=self.z_loss / microbatches,
            orth_loss=self.orth_loss / microbatches,
        )


RouterStats = dict  # group name ("text" / "vision") -> GroupStats


def summarise(stats: RouterStats | None):
    """Per-layer stats -> (losses summed over layers under their metric names, text expert load
    [L_moe, E], vision expert load [L_moe, E_vision] or None, fraction of assignments dropped over all
    groups); zero losses and no loads without MoE layers."""
    if not stats:
        zero = jnp.zeros((), jnp.float32)
        return {name: zero for name in LOSSES}, None, None, None
    losses = {PREFIX[g] + name: jnp.sum(getattr(s, name)) for g, s in stats.items() for name in LOSSES}
    dropped = sum(jnp.sum(s.dropped) for s in stats.values())
    assignments = sum(jnp.sum(s.assignments) for s in stats.values())
    vision = stats["vision"].expert_load if "vision" in stats else None
    return losses, stats["text"].expert_load, vision, dropped / jnp.maximum(assignments, 1.0)


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
