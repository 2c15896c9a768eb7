"""Paths that are local directories or object-store URLs (gs://, s3://), read and written through
`etils.epath` so a `gs://bucket/run` workdir is never turned into a local `./gs:/bucket/run`.

Object stores have no append and no atomic rename of directories; the helpers here do the local
operation where there is one and its object-store equivalent otherwise (an object write is atomic:
readers see the old object or the new one).
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
    return epath.Path(path)


def join(path, *parts: str) -> str:
    """`os.path.join` that keeps a URL a URL."""
    return os.fspath(epath.Path(path).joinpath(*parts)) if is_remote(path) else os.path.join(path, *parts)


def shown(path) -> str:
    """How a path is printed: absolute when local, the URL as is otherwise."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def write_atomic(path, data: str | bytes) -> None:
    """Write a whole file so that a reader (or a crash) sees the old contents or the new ones."""
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_remote(path):
        with epath.Path(path).open(mode) as f:
            f.write(data)
        return
    with open(os.fspath(path) + ".tmp", mode) as f:
        f.write(data)
    os.replace(os.fspath(path) + ".tmp", path)


class AppendFile:
    """A text file that grows line by line: appended to locally; rewritten whole on an object store
    (which has no append), from the lines this writer holds."""

    def __init__(self, path):
        self.path, self.remote = path, is_remote(path)
        if self.remote:
            p = epath.Path(path)
            self.text = p.read_text() if p.exists() else ""
        else:
            self._f = open(path, "a")

    def write(self, text: str) -> None:
        if self.remote:
            self.text += text
            epath.Path(self.path).write_text(self.text)
        else:
            self._f.write(text)
            self._f.flush()

    def close(self) -> None:
        if not self.remote:
            self._f.close()


def probe_write(directory, name: str = ".write-probe") -> None:
    """Write and remove a small file in `directory` (raises OSError when it cannot take one):
    permission bits and os.access miss read-only mounts and bucket permissions."""
    probe = as_path(join(directory, name))
    probe.write_text("ok")
    probe.unlink()


def files_under(directory) -> list[str]:
    """Every file below `directory`, as paths relative to it (sorted)."""
    root = epath.Path(directory)
    out, todo = [], [root]
    while todo:
        d = todo.pop()
        for child in d.iterdir():
            if child.is_dir():
                todo.append(child)
            else:
                out.append(os.fspath(child)[len(os.fspath(root)) :].lstrip("/"))
    return sorted(out)
