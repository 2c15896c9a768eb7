"""Multi-host start-up through JAX's own runtime (`jax.distributed`)."""

from __future__ import annotations

import os

import jax
from absl import logging

from ernie_jax.errors import ConfigError


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Join a multi-process job. Explicit flags win; `ERNIE_JAX_DISTRIBUTED=auto` lets JAX detect the
    cluster (TPU pod slices, SLURM, ...); with neither, this is a single-process run."""
    if coordinator_address or num_processes:
        if not (coordinator_address and num_processes > 0 and 0 <= process_id < num_processes):
            raise ConfigError(
                "multi-host needs --coordinator_address HOST:PORT, --num_processes N and "
                "--process_id in [0, N)"
            )
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    elif os.environ.get("ERNIE_JAX_DISTRIBUTED", "") == "auto":
        jax.distributed.initialize()
    else:
        return
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
