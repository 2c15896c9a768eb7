"""Operational options: a jax.profiler trace of chosen steps, and JAX's persistent compilation cache."""

from __future__ import annotations

import jax


def use_compile_cache(directory: str) -> None:
    """Point JAX's persistent compilation cache at `directory` (train.compile_cache); '' leaves it off.
    A rerun, a resume or the next stage then loads its compiled steps instead of recompiling."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", directory)


class StepProfiler:
    """Traces steps [first, last] (1-based, train.profile_steps) into `directory` for TensorBoard's
    profile plugin or Perfetto; a run that resumes past `first` traces what is left of the range."""

    def __init__(self, steps: tuple[int, ...], directory: str, say=print):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.directory, self.say = directory, say
        self.active = False
        self.started = 0

    def before(self, step: int) -> None:
        """Called before running `step` (1-based)."""
        if not self.active and self.first <= step <= self.last:
            jax.profiler.start_trace(self.directory)
            self.active, self.started = True, step

    def after(self, step: int, outputs) -> None:
        """Called once `step` was dispatched; stops the trace after the last step has finished."""
        if self.active and step >= self.last:
            self.stop(step, outputs)

    def stop(self, step: int, outputs=None) -> None:
        """Ends the trace (also when the run stops inside the range)."""
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            self.say(
                f"profile of steps {self.started}-{step} written to {self.directory} "
                f"(tensorboard --logdir {self.directory}, or the .trace.json.gz in Perfetto)"
            )
