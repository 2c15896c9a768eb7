"""Shared set-up of the sharded-equals-single-device tests: a tiny model's state as pure dicts,
placed on a mesh by the rules table (or left on one device when mesh is None)."""

import jax
from flax import nnx

from ernie_jax.model import build_model
from ernie_jax.parallel.mesh import batch_sharding, state_shardings


def model_state(cfg, mesh=None):
    """(graphdef, params, rest) of ErnieForCausalLM(cfg, seed 0); params/rest placed on `mesh`."""
    graphdef, params, rest = nnx.split(build_model(cfg, nnx.Rngs(0)), nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    if mesh is not None:
        _, ap, ab = nnx.split(nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0))), nnx.Param, ...)
        params = jax.device_put(params, state_shardings(ap, mesh))
        rest = jax.device_put(rest, state_shardings(ab, mesh))
    return graphdef, params, rest


def place_batch(batch: dict, mesh=None) -> dict:
    """[B, S] arrays split over the batch axes of `mesh` (unchanged without one)."""
    return (
        batch if mesh is None else {k: jax.device_put(v, batch_sharding(mesh, 2)) for k, v in batch.items()}
    )


def run(fn, mesh, *args):
    """jit(fn)(*args) with `mesh` set (layers read it for expert parallelism and constraints)."""
    if mesh is None:
        return jax.jit(fn)(*args)
    with jax.set_mesh(mesh):
        return jax.jit(fn)(*args)
