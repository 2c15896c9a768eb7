"""Orbax checkpoints of the whole training state + data-iterator state + resolved config.

Saves are async with keep-N. Orbax writes each step into a temporary directory and renames it when
complete, so a kill mid-save leaves no step behind; on top of that, restore walks back from the
newest step and skips any step that fails to load, so a damaged directory is never used.

Bytes damaged in place (same sizes, no error from the reader) are caught by checksums: once a
step's save has finished, `checksums.json` in it lists a CRC-32 per file, and restore checks
them first. A step saved just before a crash may have none yet; it is loaded unchecked.
"""

from __future__ import annotations

import json
import logging as logging_std
import sys
import time
import zlib

import jax
import orbax.checkpoint as ocp
from absl import logging

from ernie_jax.errors import CheckpointError
from ernie_jax.paths import as_path, files_under, join, shown, write_atomic

CHECKSUMS = "checksums.json"


class Checkpointer:
    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = shown(directory)  # absolute when local; a gs:// URL stays one
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state, data_state: dict, config: dict) -> None:
        self._finish()
        self._mgr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def saved_config(self, step: int) -> dict:
        """The resolved config saved with `step` (orbax's JSON item; no arrays are read)."""
        try:
            config = self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception:  # noqa: BLE001 - unreadable in any way means damaged
            config = None
        if not isinstance(config, dict):
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has no readable config; it is damaged"
            )
        return config

    def verified_config(self, step: int) -> dict:
        """`saved_config(step)` after checking the step's files against their checksums
        (CheckpointError naming the step when they differ or the config is unreadable)."""
        self._verify(step)
        return self.saved_config(step)

    def newest_config(self, set_aside: bool = True) -> tuple[int, dict] | None:
        """(step, saved config) of the newest step whose config reads; a damaged one is set aside
        (or, with set_aside=False, e.g. in another run's workdir, only skipped). None: no such step."""
        for step in reversed(self.steps()):
            try:
                return step, self.saved_config(step)
            except CheckpointError as e:
                if set_aside:
                    logging.warning("%s; moved to %s, trying an older one", e, self._set_aside(step))
                else:
                    logging.warning("%s; skipped, trying an older one", e)
        return None

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """(step, state, data_state) of the newest loadable step, or None when there is none."""
        _drop_closed_loop_reports()  # before the attempt: a failing restore reports while it unwinds
        for step in reversed(self.steps()):
            try:
                self._verify(step)
                restored = self._mgr.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
                return step, restored["state"], restored["data"]
            except Exception as e:  # noqa: BLE001 - any damage means: fall back to an older step
                aside = self._set_aside(step)
                logging.warning(
                    "checkpoint step %d in %s cannot be restored (%s); moved to %s, trying an older one",
                    step,
                    self.directory,
                    _short(e),
                    aside,
                )
        return None

    def _set_aside(self, step: int) -> str:
        """Rename a damaged step so it is kept for inspection but never loaded or overwritten."""
        src = join(self.directory, str(step))
        dst = f"{src}.damaged-{int(time.time())}"
        as_path(src).rename(dst)
        self._mgr.reload()
        return dst

    def wait(self) -> None:
        self._finish()

    def close(self) -> None:
        self._finish()
        self._mgr.close()

    def _finish(self) -> None:
        """Wait for a save in flight, then checksum every finished step that has none yet."""
        self._mgr.wait_until_finished()
        if jax.process_index() != 0:
            return
        for step in self.steps():
            step_dir = join(self.directory, str(step))
            if not as_path(join(step_dir, CHECKSUMS)).exists():
                write_atomic(join(step_dir, CHECKSUMS), json.dumps(_checksums(step_dir)))

    def _verify(self, step: int) -> None:
        """CheckpointError when a file of the step differs from its recorded checksum or is gone."""
        step_dir = join(self.directory, str(step))
        try:
            with as_path(join(step_dir, CHECKSUMS)).open() as f:
                recorded = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            raise CheckpointError(f"step {step}: {CHECKSUMS} is unreadable") from None
        now = _checksums(step_dir)
        bad = sorted(k for k, v in recorded.items() if now.get(k) != v)
        if bad:
            raise CheckpointError(f"step {step}: {len(bad)} file(s) differ from their checksums ({bad[0]})")


def _short(error: Exception) -> str:
    """The gist of a restore error: tensorstore appends kilobytes of JSON spec to its messages."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    text = text.split(" [tensorstore_spec")[0]
    return text if len(text) <= 300 else text[:300] + "..."


def _drop_closed_loop_reports() -> None:
    """After a failed restore orbax closes its asyncio loop while tensorstore still finishes its
    other reads: each late one reports "Event loop is closed" as an unraisable exception, or its
    error as "Future exception was never retrieved" (a hundred tracebacks for one damaged step).
    They are harmless, the step is set aside: drop exactly those, pass every other report on.
    Installed once, on the first restore."""
    previous = sys.unraisablehook
    if getattr(previous, "_ernie_jax_filter", False):
        return

    def hook(report):
        if isinstance(report.exc_value, RuntimeError) and str(report.exc_value) == "Event loop is closed":
            return
        previous(report)

    hook._ernie_jax_filter = True
    sys.unraisablehook = hook
    logging_std.getLogger("asyncio").addFilter(
        lambda record: "exception was never retrieved" not in str(record.msg)
    )


def _checksums(step_dir: str) -> dict[str, int]:
    """CRC-32 of every file under a step directory (but the checksum file), by relative path."""
    out = {}
    for rel in files_under(step_dir):
        if rel.startswith(CHECKSUMS):
            continue
        crc = 0
        with as_path(join(step_dir, rel)).open("rb") as f:
            while chunk := f.read(1 << 22):
                crc = zlib.crc32(chunk, crc)
        out[rel] = crc
    return out


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) for restoring onto the current devices."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
