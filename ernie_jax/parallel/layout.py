"""How a model's computation is laid out on the mesh, decided once from the config and handed to
the model's constructor, so model code never reads mesh or pipeline settings itself."""

from __future__ import annotations

from dataclasses import dataclass

from ernie_jax.config import Config
from ernie_jax.parallel.pipeline import Schedule, schedule_for


@dataclass(frozen=True)
class ModelLayout:
    """schedule: the pipeline schedule of the pipelined stack (None: not pipelined);
    context_shards: the sequence is split this many ways (`mesh.context`, load-balanced token order);
    expert_parallel: MoE layers move tokens to the experts' devices with `moe.transport`'s
    shard_map transports (`mesh.expert` > 1) over the mesh set with `jax.set_mesh`."""

    schedule: Schedule | None = None
    context_shards: int = 1
    expert_parallel: bool = False


def model_layout(cfg: Config) -> ModelLayout:
    return ModelLayout(
        schedule=schedule_for(cfg),
        context_shards=max(cfg.mesh.context, 1),
        # -1 (the remaining devices) may resolve to 1; the MoE block then finds no expert axis
        expert_parallel=cfg.mesh.expert != 1,
    )
