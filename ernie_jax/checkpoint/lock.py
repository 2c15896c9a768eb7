"""One run per workdir: an exclusive `flock` on `<workdir>/.lock`, which names its holder.

The kernel drops the lock when the holding process exits (however it dies), so a stale lock from a
dead run never blocks a rerun; a second live run into the same workdir refuses to start. Only
process 0 of a multi-process run takes it (every process writes into the same workdir). An
object-store workdir (gs://) has no flock: there the lock is not taken (one job per workdir is
then the job scheduler's promise, e.g. one xpk workload per run).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import jax

from ernie_jax.errors import ConfigError
from ernie_jax.paths import is_remote

LOCK_FILE = ".lock"


class WorkdirLock:
    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.remote = is_remote(workdir)
        self._fd = None

    def __enter__(self):
        if jax.process_index() != 0 or self.remote:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                f"--workdir {os.path.dirname(self.path)} is in use by another run ({holder}); "
                f"wait for it, stop it, or pass another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            ).encode(),
        )
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"process {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
