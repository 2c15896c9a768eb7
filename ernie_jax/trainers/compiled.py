"""The jitted train / eval steps as the loop runs them: under the mesh, the state's layout pinned,
compiled once per batch layout and refused before running when the step cannot fit the device."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from ernie_jax.trainers.memory import check_fits


class MeshJit:
    """A jitted function traced and run with `mesh` set (`jax.set_mesh` must be outside jit), so layers
    that need the mesh (expert-parallel transports) can read it."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def jit_train_step(step_fn, state, mesh) -> MeshJit:
    """jit with the state's layout pinned on the way out, so step k+1 takes step k's output as is
    (no drift of optimizer-moment shardings, no recompiles); metrics come back replicated."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    return MeshJit(
        jax.jit(step_fn, out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=0),
        mesh,
    )


class CompiledTrainStep:
    """Compiles the train step once per batch layout (a stage mixture alternates text and image-text
    batches) and checks each compiled step fits the device before it first runs."""

    def __init__(self, train_step: MeshJit, cfg, device, say):
        self.train_step, self.cfg, self.device, self.say = train_step, cfg, device, say
        self.compiled: dict = {}

    def __call__(self, state, batch):
        key = (jax.tree.structure(batch), tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch)))
        if key not in self.compiled:
            self.compiled[key] = self.train_step.lower(state, batch).compile()
            need = check_fits(self.compiled[key], self.cfg, self.device)
            self.say(f"train step compiled: {need / 1e9:.2f} GB per device")
        return self.compiled[key](state, batch)
