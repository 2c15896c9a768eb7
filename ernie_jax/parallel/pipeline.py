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

The train step's 1F1B schedules (plain and interleaved) run forward and backward together in one
scan of their own: `one_f_one_b` below.
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
    # gpipe | circular | 1f1b: the train step's schedule (forward-only calls run gpipe, or circular
    # with the same repeats for interleaved 1f1b)
    kind: str = "gpipe"
    stash: str = "inputs"  # 1f1b: what a stage keeps per chunk in flight (inputs | residuals)

    @property
    def forward_iterations(self) -> int:
        """Iterations of the forward-only schedule (`pipeline_apply`)."""
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def iterations(self) -> int:
        """Forward iterations (1f1b: ticks of its one scan, forward and backward together)."""
        if self.kind == "1f1b":
            return self.repeats * (self.microbatches + self.stages) + self.stages - 2
        return self.forward_iterations

    @property
    def bubble_fraction(self) -> float:
        """Share of stage time spent idle: (S - 1) / (R*M + S - 1) (1f1b: the same as gpipe / circular)."""
        return (self.stages - 1) / (self.repeats * self.microbatches + self.stages - 1)

    def describe(self, units: int | None = None) -> str:
        kind = "1f1b" if self.kind == "1f1b" else "gpipe" if self.repeats == 1 else "circular"
        if self.repeats > 1:
            kind = f"{'interleaved ' if self.kind == '1f1b' else ''}{kind} x{self.repeats}"
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
    pp = cfg.pipeline
    return Schedule(stages, pp.microbatches or stages, pp.repeats, pp.schedule, pp.stash)


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


def constrain_leading(x: jax.Array, *lead: str | None) -> jax.Array:
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
        return constrain_leading(w, "stage")

    weights = jax.tree.map(by_stage, weights)
    active = by_stage(jnp.ones((units,), bool)) if padded > units else None

    # every stage may need any microbatch: gathered over the pipeline axis, split over the others
    xs = constrain_leading(to_microbatches(x, m_), None, "batch")  # [M, mb, ...]
    ctxs = jax.tree.map(lambda c: constrain_leading(to_microbatches(c, m_), None, "batch"), ctx)

    def stage(w, on, r, x_mb, ctx_mb):
        chunk = nnx.merge(graphdef, jax.tree.map(lambda a: a[r], w))
        return apply_chunk(chunk, x_mb, ctx_mb, None if on is None else on[r])

    spmd = PIPELINE_AXIS if _mesh_has_pipeline() else None
    run_stages = functools.partial(
        jax.vmap(stage, in_axes=(0, 0, 0, 0, 0), spmd_axis_name=spmd), weights, active
    )

    stage_ids = jnp.arange(s_)
    ctx_at = lambda m: jax.tree.map(lambda c: jnp.take(c, m, axis=0), ctxs)  # [S, mb, ...]
    state0 = constrain_leading(jnp.zeros((s_, *xs.shape[1:]), xs.dtype), "stage", "batch")
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
        out = constrain_leading(out, "stage", "batch")
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
        state = constrain_leading(jnp.roll(out, 1, axis=0), "stage", "batch")
        return (state, loop_buf, outputs, stats_acc), None

    loop_buf = jnp.zeros_like(xs) if r_ > 1 else jnp.zeros((), xs.dtype)
    carry = (state0, loop_buf, jnp.zeros_like(xs), stats0)
    (_, _, outputs, stats_acc), _ = jax.lax.scan(iteration, carry, jnp.arange(sched.forward_iterations))
    # [S, R, L, ...] -> [R, S, L, ...] -> [U, ...]: chunk r*S + s, i.e. global layer order
    stats = jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(padded, *a.shape[3:])[:units], stats_acc)
    stats = {group: s.losses_over(m_) for group, s in stats.items()}
    return constrain_leading(from_microbatches(outputs), "all_batch"), stats


# ----------------------------------------------------------------------------- 1F1B


def stage_layout(units: int, sched: Schedule) -> tuple[int, Callable, Callable]:
    """(units per chunk, [U, ...] -> [S, V, L, ...] on the stage devices, and its inverse) for the
    1F1B schedules: chunk c = v*S + s (V = repeats, the interleaved schedule's chunks per stage) holds
    units c*L .. c*L+L-1, zero padding units at the end (the circular schedule's layout)."""
    s_, v_ = sched.stages, sched.repeats
    per = -(-units // (s_ * v_))

    def to_stages(w):
        if per * s_ * v_ > units:
            w = jnp.concatenate([w, jnp.zeros((per * s_ * v_ - units, *w.shape[1:]), w.dtype)])
        return constrain_leading(w.reshape(v_, s_, per, *w.shape[1:]).swapaxes(0, 1), "stage")

    def from_stages(w):
        return w.swapaxes(0, 1).reshape(s_ * v_ * per, *w.shape[3:])[:units]

    return per, to_stages, from_stages


def _work_item(pos: jax.Array, s_: int, v_: int, m_: int):
    """A stage's position in its work order -> (valid, microbatch, visit) (clipped when invalid).
    Microbatches go round the stages in groups of S: position p = g*S*V + v*S + i is microbatch
    g*S + i on its v-th visit, so a microbatch leaving the last stage reaches the first stage again
    at the next tick (1F1B: V = 1, microbatch p, visit 0)."""
    valid = (pos >= 0) & (pos < m_ * v_)
    pos = jnp.clip(pos, 0, m_ * v_ - 1)
    group, within = pos // (s_ * v_), pos % (s_ * v_)
    return valid, group * s_ + within % s_, within // s_


def one_f_one_b(
    first: Callable, chunk: Callable, post: Callable, params, other, active, ctxs, sched: Schedule
):
    """Forward and backward of a pipelined model in one scan (1F1B, Narayanan et al. 2019, as one
    SPMD program; with `sched.repeats` V > 1 the interleaved schedule of Narayanan et al. 2021, each
    stage holding V chunks of layers, chunk c = v*S + s on stage s).

    A stage's forwards follow one work order: microbatches in groups of S, each group visiting the
    stages V times (position g*S*V + v*S + i: microbatch g*S + i on visit v); stage s runs position p
    at tick p + s, so an activation leaving the last stage is on the first at the next tick, for its
    next visit or (after the last) scored by `post` (the layers after the stack, the head and the
    objective, with their gradients). Its backward starts in that tick and walks the chunks back in
    the mirrored order, one stage back per tick (position q at stage s at tick q + S - 1 - s + V*S - 1),
    ending with `first`'s backward. A stage keeps what the backward needs of its chunks in flight
    (at most 2*V*S - 1, whatever M is), nothing else per microbatch, so activation memory does not
    grow with the number of microbatches: with `sched.stash` "inputs" the chunk's input, and the
    backward recomputes the chunk's forward (`jax.vjp`); with "residuals" the forward is the
    `jax.vjp` and its pullback's residuals are kept (less the parameters, state and context, which
    the backward takes again from the stage), so nothing is recomputed beyond the model's own
    remat policy (under `model.remat=full`: the layers' inputs, one forward per chunk saved). A stage
    without work in a tick writes to a spare stash slot. The forward and backward halves of a tick
    are `lax.cond`s on whether any stage has work: M*V + S - 1 ticks of each, each running one chunk
    of L units, so the bubble is (S - 1) / (M*V + S - 1) of the stage time, V times less than 1F1B's.

    first(k, dx=None) -> the stack's input for microbatch k [mb, ...], or (with dx, its cotangent)
    the gradients of the parameters before the stack.
    chunk(params_l, other_l, x_mb, ctx_mb, active_l) -> (y_mb, stats): one chunk of L units
    (stats: a pytree with a leading L axis); params / other: the stack's parameters (differentiated)
    and other state, [S, V, L, ...] on the stage devices (`stage_layout`); active [S, V, L] bool
    (False: padding units); ctxs (pytree of [M, mb, ...]): the blocks' context per microbatch.
    post(y_mb, stats [S, V, L, ...], k) -> (loss, aux, rest_grads, dy, dstats): microbatch k scored,
    with gradients of its loss w.r.t. the parameters outside the stack and w.r.t. its inputs.

    Returns (summed loss, summed aux, summed gradients outside the stack, stack grads [S, V, L, ...])."""
    s_, m_, v_ = sched.stages, sched.microbatches, sched.repeats
    slots = 2 * v_ * s_ - 1
    sid = jnp.arange(s_)
    spmd = PIPELINE_AXIS if _mesh_has_pipeline() else None
    ctx_at = lambda k: jax.tree.map(lambda c: jnp.take(c, k, axis=0), ctxs)  # [S, mb, ...]
    pick = lambda tree, v: jax.tree.map(lambda a: a[v], tree)

    keep = sched.stash == "residuals"
    layout = {}  # residuals: the pullback's tree and which of its leaves are the chunk's own inputs

    def own_inputs(p_v, o_v, a_v, ctx):
        return jax.tree.leaves((p_v, o_v, a_v, ctx))

    def pullback(p_v, o_v, a_v, x, ctx):
        """((y, stats), the chunk's vjp w.r.t. its parameters and input)."""
        return jax.vjp(lambda p_v, x: chunk(p_v, o_v, x, ctx, a_v), p_v, x)

    def forward_one(p, o, a, v, x, ctx):
        """-> (y, stats, what the backward needs: the chunk input, or the pullback's residuals less
        the parameters, state and context it can take again from the stage)."""
        p_v, o_v, a_v = pick(p, v), pick(o, v), pick(a, v)
        if not keep:
            y, st = chunk(p_v, o_v, x, ctx, a_v)
            return y, st, [x]
        (y, st), vjp = pullback(p_v, o_v, a_v, x, ctx)
        leaves, tree = jax.tree.flatten(vjp)
        known = {id(t): i for i, t in enumerate(own_inputs(p_v, o_v, a_v, ctx))}
        layout["tree"], layout["from"] = tree, tuple(known.get(id(r)) for r in leaves)
        return y, st, [r for r, i in zip(leaves, layout["from"]) if i is None]

    def backward_one(p, o, a, v, ok, acc, saved, ctx, dy, dstats):
        """Stage-local: the chunk's vjp, its parameter gradients added to visit v's slot of acc."""
        p_v, o_v, a_v = pick(p, v), pick(o, v), pick(a, v)
        if keep:
            again, rest = own_inputs(p_v, o_v, a_v, ctx), iter(saved)
            leaves = [next(rest) if i is None else again[i] for i in layout["from"]]
            vjp = jax.tree.unflatten(layout["tree"], leaves)
        else:  # recompute the chunk's forward from its stashed input
            _, vjp = pullback(p_v, o_v, a_v, saved[0], ctx)
        dp, dx = vjp((dy, dstats))  # router statistics are float (counts included): plain cotangents
        acc = jax.tree.map(lambda g, d: g.at[v].add(jnp.where(ok, d, 0).astype(g.dtype)), acc, dp)
        return acc, dx

    forward = jax.vmap(forward_one, spmd_axis_name=spmd)
    backward = jax.vmap(backward_one, spmd_axis_name=spmd)

    x_mb = jax.eval_shape(first, jnp.int32(0))
    x0 = constrain_leading(jnp.zeros((s_, *x_mb.shape), x_mb.dtype), "stage", "batch")
    z = jnp.zeros((s_,), jnp.int32)
    _, stats_shape, saved_shape = jax.eval_shape(forward, params, other, active, z, x0, ctx_at(z))
    # a travelling record of one microbatch's statistics at every (stage, visit): [S, S, V, L, ...]
    rec0 = jax.tree.map(lambda a: jnp.zeros((s_, s_, v_) + a.shape[1:], a.dtype), stats_shape)
    probe = jax.eval_shape(post, x0[0], jax.tree.map(lambda a: a[0], rec0), jnp.int32(0))
    zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
    loss0, aux0, rest0 = zeros(probe[:3])
    add = lambda acc, v: jax.tree.map(jnp.add, acc, v)

    def tick(carry, t):
        fx, frec, stash, bdy, brec, dparams, loss, aux, rest = carry
        pf = t - sid
        vf, mf, visit_f = _work_item(pf, s_, v_, m_)

        def run_forward(fx, frec, stash):
            fresh = vf[0] & (visit_f[0] == 0)  # a microbatch enters; else stage 0 takes the wrap-around
            fx = fx.at[0].set(jax.lax.cond(fresh, first, lambda k: fx[0], mf[0]))
            y, st, saved = forward(params, other, active, visit_f, fx, ctx_at(mf))
            slot = jnp.where(vf, pf % slots, slots)  # a stage without work writes to the spare slot
            stash = jax.tree.map(lambda b, n: b.at[sid, slot].set(n), stash, saved)
            rec = jax.tree.map(lambda r, v: r.at[sid, sid, visit_f].set(v), frec, st)
            last = (y[-1], jax.tree.map(lambda r: r[-1], rec))
            fx = constrain_leading(jnp.roll(y, 1, axis=0), "stage", "batch")
            return fx, jax.tree.map(lambda r: jnp.roll(r, 1, axis=0), rec), stash, last

        def no_forward(fx, frec, stash):
            return fx, frec, stash, (fx[-1], jax.tree.map(lambda r: r[-1], frec))

        fx, frec, stash, (y_last, rec_last) = jax.lax.cond(
            t < m_ * v_ + s_ - 1, run_forward, no_forward, fx, frec, stash
        )

        def score(loss, aux, rest, bdy, brec):
            value, a, g, dy, drec = post(y_last, rec_last, mf[-1])
            bdy = bdy.at[-1].set(dy.astype(bdy.dtype))
            brec = jax.tree.map(lambda b, d: b.at[-1].set(d.astype(b.dtype)), brec, drec)
            return add(loss, value), add(aux, a), add(rest, g), bdy, brec

        done = vf[-1] & (visit_f[-1] == v_ - 1)  # the last stage finished a microbatch's last visit
        loss, aux, rest, bdy, brec = jax.lax.cond(done, score, lambda *a: a, loss, aux, rest, bdy, brec)

        def run_backward(bdy, brec, dparams, rest):
            vb, mb, mirrored = _work_item(t - (s_ - 1 - sid) - (v_ * s_ - 1), s_, v_, m_)
            visit = v_ - 1 - mirrored
            pos = (mb // s_) * s_ * v_ + visit * s_ + mb % s_  # the forward position it mirrors
            saved = jax.tree.map(lambda b: b[sid, pos % slots], stash)
            own = jax.tree.map(lambda r: r[sid, sid, visit], brec)  # this chunk's statistics' cotangents
            dparams, dx = backward(params, other, active, visit, vb, dparams, saved, ctx_at(mb), bdy, own)
            leaving = vb[0] & (visit[0] == 0)  # the first chunk's backward: on through `first`
            rest = jax.lax.cond(
                leaving, lambda r: add(r, first(mb[0], dx[0].astype(x_mb.dtype))), lambda r: r, rest
            )
            bdy = constrain_leading(jnp.roll(dx, -1, axis=0), "stage", "batch")
            brec = jax.tree.map(lambda r: jnp.roll(r, -1, axis=0), brec)
            return bdy, brec, dparams, rest

        bdy, brec, dparams, rest = jax.lax.cond(
            t >= v_ * s_ - 1, run_backward, lambda *a: a, bdy, brec, dparams, rest
        )
        return (fx, frec, stash, bdy, brec, dparams, loss, aux, rest), None

    lead = ("stage",) if keep else ("stage", None, "batch")  # residuals: their batch dim varies
    stash0 = jax.tree.map(
        lambda a: constrain_leading(jnp.zeros((s_, slots + 1, *a.shape[1:]), a.dtype), *lead), saved_shape
    )
    carry = (
        x0,
        rec0,
        stash0,
        jnp.zeros_like(x0),
        jax.tree.map(jnp.zeros_like, rec0),
        jax.tree.map(jnp.zeros_like, params),
        loss0,
        aux0,
        rest0,
    )
    carry, _ = jax.lax.scan(tick, carry, jnp.arange(sched.iterations))
    *_, dparams, loss, aux, rest = carry
    return loss, aux, rest, dparams
