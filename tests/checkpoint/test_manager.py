"""Checkpointer: damaged steps fall back quietly (one warning, no tracebacks from orbax's threads)."""

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp

from ernie_jax.checkpoint.manager import CHECKSUMS, Checkpointer


def _state(value: float) -> dict:
    return {f"w{i}": jnp.full((8, 4), value + i, jnp.float32) for i in range(24)}


# in a fresh interpreter: pytest installs its own hooks for unraisable exceptions, which would hide the noise
RESTORE = textwrap.dedent("""
    import gc, sys
    import jax.numpy as jnp
    import numpy as np
    from ernie_jax.checkpoint.manager import Checkpointer, abstract_like
    state = {f"w{i}": jnp.zeros((8, 4), jnp.float32) for i in range(24)}
    ckpt = Checkpointer(sys.argv[1], keep=3, async_save=True)
    step, restored, data = ckpt.restore_latest(abstract_like(state))
    gc.collect()   # late futures of the failed restore report when collected
    ckpt.close()
    assert (step, data) == (1, {"count": 1}), (step, data)
    np.testing.assert_array_equal(np.asarray(restored["w3"]), np.full((8, 4), 4.0))
""")


def test_damaged_manifest_without_checksums_falls_back_without_tracebacks(tmp_path):
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, keep=3, async_save=True)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"count": step}, {"note": "test"})
    ckpt.close()
    # a step saved just before a crash has no checksums yet; its manifest then got damaged
    os.remove(os.path.join(directory, "2", CHECKSUMS))
    with open(os.path.join(directory, "2", "state", "manifest.ocdbt"), "wb") as f:
        f.write(os.urandom(100))
    r = subprocess.run(
        [sys.executable, "-c", RESTORE, directory], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert any(n.startswith("2.damaged-") for n in os.listdir(directory))
    assert "Traceback" not in r.stderr and "never retrieved" not in r.stderr, r.stderr[-1500:]
    warnings = [line for line in r.stderr.splitlines() if "cannot be restored" in line]
    assert len(warnings) == 1 and len(warnings[0]) < 700, r.stderr[-1500:]


def test_unreadable_saved_config_sets_the_step_aside(tmp_path):
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"count": step}, {"train": {"steps": step}})
    ckpt.close()
    with open(os.path.join(directory, "2", "config", "metadata"), "wb") as f:
        f.write(os.urandom(64))
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    assert ckpt.saved_config(1) == {"train": {"steps": 1}}
    assert ckpt.newest_config() == (1, {"train": {"steps": 1}})
    assert any(n.startswith("2.damaged-") for n in os.listdir(directory)) and ckpt.steps() == [1]
    ckpt.close()
