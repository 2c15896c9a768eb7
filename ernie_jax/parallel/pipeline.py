"""Pipeline parallelism: GPipe and circular schedules as one `lax.scan` over iterations (SPMD).

The pipelined stack (leading axis U, in global layer order) is viewed as [R, S, L, ...]: R repeats,
S stages, L units per chunk; chunk c = r*S + s holds units c*L .. c*L+L-1 and runs on stage s, so
every microbatch visits stage 0..S-1 R times and meets the chunks in layer order. GPipe is R = 1.
When R*S does not divide U (27 MoE units of 21B-A3B on 4 stages), the stack is padded at the end
with units that pass their input through (L = ceil(U / (R*S))).

The batch is split into M microbatches (rows m, m+M, m+2M, ... form microbatch m, so each one is
spread over the data axes). Work item k = r*M + m (microbatch m in repeat r) is on stage s at
iteration t = k + s; all stages run at once as a `vmap` over the stage axis, which is sharded over
`pipeline`, and then the activations move one stage on (a roll along that axis, a collective
permute between neighbouring devices). The last stage's output of item k feeds stage 0 again at
iteration k + M (a buffer [M, ...] bridges the M - S iterations in between, hence M >= S for R > 1)
or, in the last repeat, is the final output. Iterations: T = R*M + S - 1; each stage idles S - 1 of
them, so the bubble is (S - 1) / (R*M + S - 1) (MaxText's formula; GSPMD pipelining, Xu et al. 2021).

Router statistics of every (stage, item) are summed per layer over the valid items; losses are then
the mean over microbatches (as under gradient accumulation) and counts (expert load, drops) the
total. Backward is autodiff through the scan; the parameters keep their global layer order in the
state, so checkpoints do not depend on the pipeline layout (R > 1 costs one all-to-all of the
pipelined weights over the pipeline axis per step to regroup them by stage).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from ernie_jax.errors import ConfigError
from ernie_jax.parallel.mesh import activation_batch_axes

PIPELINE_AXIS = "pipeline"


@dataclass(frozen=True)
class Schedule:
    stages: int
    microbatches: int
    repeats: int

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        """Share of stage-iterations spent idle: (S - 1) / (R*M + S - 1)."""
        return (self.stages - 1) / self.iterations

    def describe(self, units: int | None = None) -> str:
        kind = "gpipe" if self.repeats == 1 else f"circular x{self.repeats}"
        text = (
            f"pipeline {kind}: {self.stages} stages, {self.microbatches} microbatches, "
            f"{self.iterations} iterations, bubble {self.bubble_fraction:.1%}"
        )
        chunks = self.stages * self.repeats
        if units is not None and units % chunks:
            per = -(-units // chunks)
            text += f"; {units} units in chunks of {per}, {per * chunks - units} pass-through padding"
        return text


def schedule_for(cfg) -> Schedule | None:
    """The config's schedule, or None when the model is not pipelined (mesh.pipeline == 1)."""
    stages = cfg.mesh.pipeline
    if stages <= 1:
        return None
    return Schedule(stages, cfg.pipeline.microbatches or stages, cfg.pipeline.repeats)


def check_pipeline_batch(cfg, mesh) -> None:
    """Each microbatch must split evenly over the batch axes a stage uses."""
    sched = schedule_for(cfg)
    if sched is None:
        return
    per_stage = math.prod(mesh.shape[a] for a in activation_batch_axes(mesh, in_stage=True))
    micro = cfg.data.batch_size // sched.microbatches
    if micro % per_stage:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} / pipeline.microbatches={sched.microbatches} = "
            f"{micro} rows per microbatch, not divisible by mesh data x fsdp x expert = {per_stage}; "
            f"use fewer microbatches or a larger batch"
        )


def _mesh_has_pipeline() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and PIPELINE_AXIS in mesh.axis_names and mesh.shape[PIPELINE_AXIS] > 1


def _constrain(x: jax.Array, *lead: str | None) -> jax.Array:
    """Pin the leading dims of x: "stage" -> the pipeline axis, "batch" -> the batch axes a stage
    splits its microbatch over, "all_batch" -> every batch axis (outside the pipeline), None ->
    replicated; later dims are left to XLA."""
    if not _mesh_has_pipeline():
        return x
    mesh = jax.sharding.get_abstract_mesh()
    named = {
        "stage": PIPELINE_AXIS,
        "batch": activation_batch_axes(mesh, in_stage=True) or None,
        "all_batch": activation_batch_axes(mesh) or None,
        None: None,
    }
    spec = P(*(named[d] for d in lead), *([P.UNCONSTRAINED] * (x.ndim - len(lead))))
    return jax.lax.with_sharding_constraint(x, spec)


def to_microbatches(a: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B/M, ...]; microbatch i holds rows i, i+M, i+2M, ..."""
    return a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1)


def from_microbatches(a: jax.Array) -> jax.Array:
    """Inverse of `to_microbatches`."""
    return a.swapaxes(0, 1).reshape(-1, *a.shape[2:])


def pipeline_apply(stack: nnx.Module, x: jax.Array, ctx, apply_chunk: Callable, sched: Schedule):
    """Run the stacked module `stack` (leading axis U = R*S*L) over x [B, ...] with a pytree `ctx`
    of per-row context arrays ([B, ...] each).
    `apply_chunk(chunk_module, x_mb, ctx_mb) -> (y_mb, stats)` applies
    one chunk of L units. Returns (y [B, ...], stats with a leading axis U in layer order)."""
    s_, m_, r_ = sched.stages, sched.microbatches, sched.repeats
    graphdef, weights = nnx.split(stack)
    units = jax.tree.leaves(weights)[0].shape[0]
    per_chunk = -(-units // (s_ * r_))
    padded = per_chunk * s_ * r_  # uneven stages: trailing padding units that pass x through

    def by_stage(w):  # [U, ...] -> [S, R, L, ...], stage axis on the pipeline devices
        if padded > units:
            w = jnp.concatenate([w, jnp.zeros((padded - units, *w.shape[1:]), w.dtype)])
        w = w.reshape(r_, s_, per_chunk, *w.shape[1:]).swapaxes(0, 1)
        return _constrain(w, "stage")

    weights = jax.tree.map(by_stage, weights)
    active = by_stage(jnp.ones((units,), bool)) if padded > units else None

    # every stage may need any microbatch: gathered over the pipeline axis, split over the others
    xs = _constrain(to_microbatches(x, m_), None, "batch")  # [M, mb, ...]
    ctxs = jax.tree.map(lambda c: _constrain(to_microbatches(c, m_), None, "batch"), ctx)

    def stage(w, on, r, x_mb, ctx_mb):
        chunk = nnx.merge(graphdef, jax.tree.map(lambda a: a[r], w))
        return apply_chunk(chunk, x_mb, ctx_mb, None if on is None else on[r])

    spmd = PIPELINE_AXIS if _mesh_has_pipeline() else None
    run_stages = functools.partial(
        jax.vmap(stage, in_axes=(0, 0, 0, 0, 0), spmd_axis_name=spmd), weights, active
    )

    stage_ids = jnp.arange(s_)
    ctx_at = lambda m: jax.tree.map(lambda c: jnp.take(c, m, axis=0), ctxs)  # [S, mb, ...]
    state0 = _constrain(jnp.zeros((s_, *xs.shape[1:]), xs.dtype), "stage", "batch")
    _, stats_shape = jax.eval_shape(
        run_stages, jnp.zeros((s_,), jnp.int32), state0, ctx_at(jnp.zeros((s_,), jnp.int32))
    )
    stats0 = jax.tree.map(lambda a: jnp.zeros((s_, r_) + a.shape[1:], a.dtype), stats_shape)

    def iteration(carry, t):
        state, loop_buf, outputs, stats_acc = carry
        k = t - stage_ids  # work item on each stage
        valid = (k >= 0) & (k < r_ * m_)
        kc = jnp.clip(k, 0, r_ * m_ - 1)
        mb, rep = kc % m_, kc // m_
        first = (
            xs[mb[0]] if r_ == 1 else jnp.where(rep[0] == 0, xs[mb[0]], loop_buf[mb[0]])
        )  # fresh or looped
        state = state.at[0].set(first)
        out, stats = run_stages(rep, state, ctx_at(mb))
        out = _constrain(out, "stage", "batch")
        last, m_last, r_last, v_last = out[-1], mb[-1], rep[-1], valid[-1]
        if r_ > 1:
            loop_buf = loop_buf.at[m_last].set(jnp.where(v_last, last, loop_buf[m_last]))
        outputs = outputs.at[m_last].set(jnp.where(v_last & (r_last == r_ - 1), last, outputs[m_last]))
        hit = (rep[:, None] == jnp.arange(r_)) & valid[:, None]  # [S, R]
        # `where`, not a product: a bubble stage's statistics must not leak in, even as inf/NaN
        stats_acc = jax.tree.map(
            lambda acc, v: (
                acc + jnp.where(hit.reshape(hit.shape + (1,) * (v.ndim - 1)), v[:, None], 0).astype(acc.dtype)
            ),
            stats_acc,
            stats,
        )
        state = _constrain(jnp.roll(out, 1, axis=0), "stage", "batch")
        return (state, loop_buf, outputs, stats_acc), None

    loop_buf = jnp.zeros_like(xs) if r_ > 1 else jnp.zeros((), xs.dtype)
    carry = (state0, loop_buf, jnp.zeros_like(xs), stats0)
    (_, _, outputs, stats_acc), _ = jax.lax.scan(iteration, carry, jnp.arange(sched.iterations))
    # [S, R, L, ...] -> [R, S, L, ...] -> [U, ...]: chunk r*S + s, i.e. global layer order
    stats = jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(padded, *a.shape[3:])[:units], stats_acc)
    stats = {group: s.losses_over(m_) for group, s in stats.items()}
    return _constrain(from_microbatches(outputs), "all_batch"), stats
