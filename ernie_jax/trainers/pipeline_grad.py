"""The train step's loss and gradients under the 1F1B pipeline schedule (`pipeline.schedule: 1f1b`).

The model splits at the pipelined stack: before it (embeddings, leading dense layers), the stack
(stages of units), after it (trailing layers, MTP, head, the objective). The part before runs on the
whole micro-batch under `jax.vjp`; the stack and the part after run per pipeline microbatch inside
`parallel.pipeline.one_f_one_b`, which scores each microbatch as it leaves the last stage and runs
its backward right away; the stack inputs' cotangents then go back through the part before.

The loss is the mean over pipeline microbatches of the objective on each (how gradient accumulation
treats its micro-batches); it equals the whole-batch loss of GPipe or no pipeline when every
microbatch has the same number of loss tokens (packed pretraining rows), and is the accumulation-
style mean otherwise. Metrics are averaged over microbatches (token counts summed), expert loads
summed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.config import Config, layer_plan
from ernie_jax.parallel.pipeline import (
    constrain_leading,
    from_microbatches,
    one_f_one_b,
    schedule_for,
    stage_layout,
    to_microbatches,
)


def one_f_one_b_value_and_grad(graphdef, cfg: Config, objective: Callable) -> Callable:
    """A drop-in for `jax.value_and_grad(loss_fn, has_aux=True)` of the train step:
    (params, buffers, base, micro) -> ((loss, (metrics, loads)), grads)."""
    sched = schedule_for(cfg)
    name = layer_plan(cfg).pipelined_stack  # "units", or "prefix" for a dense model
    m_ = sched.microbatches

    def value_and_grad(params, buffers, base, micro):
        del base  # LoRA is refused for 1f1b (config checks)
        rest = {k: v for k, v in params.items() if k != name}
        frozen_stack = jax.lax.stop_gradient(params[name])
        model_with = lambda rest, stack: nnx.merge(graphdef, {**rest, name: stack}, buffers)

        def before(rest):
            model = model_with(rest, frozen_stack)
            x, prep = model.prepare(
                micro["input_ids"],
                micro.get("positions"),
                micro.get("segment_ids"),
                labels=micro.get("labels"),
            )
            if name == "units" and model.prefix is not None:
                x, _ = model.run_stack("prefix", x, prep.ctx)
            return x, prep

        x, before_vjp, prep = jax.vjp(before, rest, has_aux=True)
        split = lambda a: constrain_leading(to_microbatches(jnp.asarray(a), m_), None, "batch")
        micros = jax.tree.map(split, micro)
        xs, ctxs = split(x), jax.tree.map(split, prep.ctx)

        model = model_with(rest, params[name])
        sgraph, sparams, sother = nnx.split(getattr(model, name), nnx.Param, ...)
        sparams, sother = nnx.to_pure_dict(sparams), nnx.to_pure_dict(sother)
        units = jax.tree.leaves(sparams)[0].shape[0]
        per, to_stages, from_stages = stage_layout(units, sched)
        by_stage = lambda tree: jax.tree.map(to_stages, tree)
        padded = per * sched.stages > units
        active = to_stages(jnp.ones((units,), bool)) if padded else None

        def chunk(p, o, x_mb, ctx_mb, on):
            return model.stage_chunk(nnx.merge(sgraph, p, o), x_mb, ctx_mb, on)

        def post(y, record, k):
            """Microbatch k leaving the last stage: its loss, and gradients w.r.t. the parameters
            outside the stack, its hidden states and its stack statistics."""
            stats = jax.tree.map(from_stages, record)  # [S, L, ...] -> [U, ...], layer order
            micro_k = jax.tree.map(lambda a: a[k], micros)

            def scored(rest, h, stats):
                model = model_with(rest, frozen_stack)
                _, prep_k = model.prepare(  # the microbatch's context and labels (its embeddings go unused)
                    micro_k["input_ids"],
                    micro_k.get("positions"),
                    micro_k.get("segment_ids"),
                    labels=micro_k.get("labels"),
                )
                if name == "units" and model.suffix is not None:
                    h, _ = model.run_stack("suffix", h, prep_k.ctx)
                out = model.finish(h, prep_k, stats if name == "units" else None)
                loss, metrics = objective(out, micro_k, cfg)
                return loss, (metrics, out.loads())

            (loss, aux), (g_rest, dy, dstats) = jax.value_and_grad(scored, argnums=(0, 1, 2), has_aux=True)(
                rest, y, stats
            )
            return loss, aux, g_rest, dy, by_stage(dstats)

        loss, (metrics, loads), g_after, d_stack, dxs = one_f_one_b(
            chunk, post, by_stage(sparams), by_stage(sother), active, xs, ctxs, sched
        )
        (g_before,) = before_vjp(from_microbatches(dxs).astype(x.dtype))
        grads = jax.tree.map(lambda a, b: (a + b) / m_, g_before, g_after)
        grads[name] = jax.tree.map(lambda d: from_stages(d) / m_, d_stack)
        metrics = {k: (v if k == "tokens" else v / m_) for k, v in metrics.items()}
        return (loss / m_, (metrics, loads)), grads

    return value_and_grad
