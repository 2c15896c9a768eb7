"""The metrics of the steps since the last log line: summed on the device, read once per log line,
turned into one row (averages over the steps that updated, skipped steps, throughput, MFU)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


class LogWindow:
    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float, num_devices: int):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_total = peak_flops * num_devices
        self.sums, self.count = None, 0
        self.t_log = time.perf_counter()
        self.t_first = None  # when the first step (compile included) had finished
        self.first_step = 0
        self.window_steps = 0  # how many steps the last row covered

    def add(self, step: int, metrics: dict) -> None:
        self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
        self.count += 1
        if self.t_first is None:  # throughput is timed from the end of the first (compiling) step
            jax.block_until_ready(metrics)
            self.t_first = self.t_log = time.perf_counter()
            self.first_step = step

    def row(self, step: int) -> dict:
        """The row for the steps since the last one (one host read), and a fresh window."""
        host = jax.device_get(self.sums)
        now = time.perf_counter()
        skipped = int(host.pop("skipped"))
        count = self.count
        # averages over the steps that updated; none when every step was skipped
        row = {k: v / (count - skipped) for k, v in host.items() if k != "tokens"} if count > skipped else {}
        row["skipped_steps"] = skipped
        timed = step - self.first_step
        if timed > 0 and now > self.t_log:
            row["tokens_per_s"] = self.tokens_per_step * min(count, timed) / (now - self.t_log)
            row["mfu"] = self.flops_per_token * row["tokens_per_s"] / self.peak_total
        row["step_time_s"] = (now - self.t_log) / max(count, 1)
        self.window_steps = count
        self.sums, self.count, self.t_log = None, 0, time.perf_counter()
        return row

    def eta(self, step: int, total: int) -> float:
        return (time.perf_counter() - self.t_first) / max(step - self.first_step, 1) * (total - step)
