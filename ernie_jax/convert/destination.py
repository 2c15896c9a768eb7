"""Where conversions write: a destination must be new (or an empty directory) and writable, checked
before any tensor is read; the output is written to a temporary sibling and renamed into place (or
uploaded) at the end, so a failed conversion leaves nothing at the destination."""

from __future__ import annotations

import os
import shutil
import tempfile

from ernie_jax.errors import CheckpointError
from ernie_jax.paths import as_path, files_under, is_remote, join, probe_write, shown


def log_progress(msg: str, quiet: bool) -> None:
    """A conversion's progress line (readers, writers and entry points share it)."""
    if not quiet:
        print(msg, flush=True)


class atomic_dir:
    """Write into a temporary local directory; on success it becomes `path`: renamed into place when
    `path` is local, uploaded file by file when it is an object-store URL, with the config files last
    (`keyed_on`: a reader keys on them, so a half-uploaded directory is never taken for a finished
    one)."""

    def __init__(self, path: str, keyed_on: tuple[str, ...]):
        self.path, self.keyed_on = shown(path), keyed_on

    def __enter__(self) -> str:
        check_destination(self.path)
        near = None if is_remote(self.path) else os.path.dirname(self.path)
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.path) + ".partial-", dir=near)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError):  # disk full, quota, a read-only mount appearing mid-write
                raise CheckpointError(
                    f"cannot write {self.path} ({exc.strerror or exc}); nothing was written "
                    f"there: free space or choose another destination"
                ) from None
            return False
        if is_remote(self.path):
            try:
                for rel in sorted(files_under(self.tmp), key=lambda r: r in self.keyed_on):
                    as_path(join(self.path, rel)).parent.mkdir(parents=True, exist_ok=True)
                    with open(os.path.join(self.tmp, rel), "rb") as src:
                        with as_path(join(self.path, rel)).open("wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 24)  # streamed: a shard is never held whole
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.isdir(self.path):
            os.rmdir(self.path)
        os.rename(self.tmp, self.path)
        return False


def check_destination(path: str) -> None:
    """A conversion destination must be new (or an empty directory) inside a writable directory:
    checked before any tensor is read, so a long conversion cannot fail at its end."""
    if is_remote(path):
        dest = as_path(path)
        if dest.exists() and (not dest.is_dir() or any(True for _ in dest.iterdir())):
            raise CheckpointError(
                f"destination {path} already exists and is not empty; choose a new directory"
            )
        try:
            probe_write(path)
        except OSError as e:
            raise CheckpointError(
                f"destination {path}: cannot write there ({e}); check the bucket and its permissions"
            ) from None
        return
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise CheckpointError(f"destination {path} already exists and is not empty; choose a new directory")
    parent = os.path.dirname(path)
    if os.path.isfile(parent):
        raise CheckpointError(
            f"destination {path}: {parent} is a file, not a directory; choose another destination"
        )
    try:
        os.makedirs(parent, exist_ok=True)
        tempfile.TemporaryFile(dir=parent).close()  # os.access is not enough: root on a read-only mount
    except OSError as e:
        raise CheckpointError(
            f"destination {path}: cannot write in {parent} ({e.strerror or e}); choose a writable directory"
        ) from None
