"""What keeps a run from being lost: signals stop it cleanly, non-finite steps are counted and stop
it after a run of them, a save in flight finishes before an error propagates, and a checkpoint with
non-finite params is never written."""

from __future__ import annotations

import signal

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from ernie_jax.errors import TrainingError


class StopFlag:
    """SIGTERM/SIGINT: finish the current step, save, exit cleanly.

    In a multi-process job a SIGTERM reaches one host (a preempted VM) or a few: JAX's preemption
    service (started by `jax.distributed.initialize`) catches it and agrees with every host on one
    step to stop at, which `poll(step)` reports, so all hosts save the same step and leave together
    instead of the others hanging in the next collective. SIGTERM is left to that service there."""

    def __init__(self):
        self.stop = False
        self._old = {}
        self.multi = jax.process_count() > 1

    def __enter__(self):
        for sig in (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def poll(self, step: int) -> bool:
        """After each step (every host, the same steps): whether to save and stop now."""
        if self.multi and not self.stop and multihost_utils.reached_preemption_sync_point(step):
            self.stop = True
        return self.stop

    def _handle(self, signum, frame):
        self.stop = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@jax.jit
def all_finite(tree) -> jax.Array:
    return jnp.all(
        jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
        )
    )


class SkipCounter:
    """Steps the train step skipped (non-finite loss / gradients / updates): their per-step flags
    stay on the device until a log line or a save reads them; `max_in_a_row` in a row stop the run."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.flags = max_in_a_row, []
        self.in_a_row = self.total = 0
        self.first = None
        self.message = ""

    def update(self, step: int) -> None:
        flags, self.flags = jax.device_get(self.flags), []
        for k, skipped in enumerate(flags):
            if skipped > 0:
                self.in_a_row += 1
                self.total += 1
                self.first = step - len(flags) + k + 1 if self.in_a_row == 1 else self.first
            else:
                self.in_a_row = 0
            if self.in_a_row >= self.max_in_a_row:
                self.message = (
                    f"loss or gradients not finite for {self.in_a_row} steps in a row (steps "
                    f"{self.first}-{self.first + self.in_a_row - 1}, updates skipped; "
                    f"train.max_skipped_steps={self.max_in_a_row}): lower optimizer.learning_rate, "
                    f"raise optimizer.warmup_steps or check the data"
                )
                raise TrainingError(self.message)


def finish_saves(ckpt) -> None:
    """Let a save in flight finish before an error propagates; its own failure is only logged."""
    try:
        ckpt.wait()
    except Exception as e:  # noqa: BLE001 - the original error is the one to report
        logging.warning("a checkpoint save in flight failed while stopping: %s", e)
