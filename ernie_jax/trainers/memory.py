"""Device memory: does the compiled train step fit, and the one-line answer when it does not.

The step is compiled before it first runs and XLA's own accounting of it (`memory_analysis`:
arguments, temporaries, outputs not aliased to donated inputs) is compared with what the device
has (its allocator limit on accelerators; on the CPU the host's available memory, shared by all
local devices). An allocation failure while a step runs gets the same one-line advice.
"""

from __future__ import annotations

import re

import jax

from ernie_jax.config import Config
from ernie_jax.errors import ResourceError


def step_bytes(compiled) -> int:
    """Bytes one device needs to run the compiled step."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def available_bytes(device) -> tuple[int | None, str]:
    """(bytes one device may use, where the figure comes from); None when unknown."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} allocator limit"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except (OSError, ValueError, IndexError):
        return None, "unknown"
    shared = max(len(jax.local_devices()), 1)
    return info.get("MemAvailable", 0) // shared, f"host memory available / {shared} local devices"


def advice(cfg: Config) -> str:
    d = cfg.data
    return (
        f"at data.seq_len={d.seq_len} x data.batch_size={d.batch_size} (x optimizer.grad_accum_steps="
        f"{cfg.optimizer.grad_accum_steps}): lower data.seq_len or data.batch_size, "
        f"use model.attention=flash, "
        f"model.remat=full, or split the sequence with mesh.context"
    )


def check_fits(compiled, cfg: Config, device) -> int:
    """The step's bytes per device; ResourceError before any compute when they exceed the device."""
    need = step_bytes(compiled)
    have, source = available_bytes(device)
    if have is not None and need > have * 1.05:
        raise ResourceError(
            f"out of memory: the compiled train step needs {need / 1e9:.1f} GB per device but "
            f"{have / 1e9:.1f} GB are available ({source}) {advice(cfg)}"
        )
    return need


def out_of_memory(error: BaseException, cfg: Config, step: int) -> ResourceError:
    """The one-line error for an allocation failure while running step `step`."""
    found = re.search(r"allocating (\d+) bytes", str(error))
    size = f" ({int(found.group(1)) / 1e9:.1f} GB at once)" if found else ""
    return ResourceError(f"out of memory while running step {step}{size} {advice(cfg)}")
