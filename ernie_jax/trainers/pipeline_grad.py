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
        # under LoRA, params are the adapters and `base` the frozen weights (never differentiated)
        rest = {k: v for k, v in params.items() if k != name}
        frozen_stack = jax.lax.stop_gradient(params.get(name, {}))
        frozen = (base,) if base else ()
        model_with = lambda rest, stack: nnx.merge(graphdef, {**rest, name: stack}, buffers, *frozen)

        split = lambda a: constrain_leading(to_microbatches(jnp.asarray(a), m_), None, "batch")
        micros = jax.tree.map(split, micro)

        def prepared(model, micro_k):
            """(token embeddings, `Prepared`: the blocks' context and the labels) of micro_k."""
            ids, positions, segments = (
                micro_k["input_ids"],
                micro_k.get("positions"),
                micro_k.get("segment_ids"),
            )
            return model.prepare(ids, positions, segments, labels=micro_k.get("labels"))

        def before(rest, micro_k):
            """Microbatch micro_k up to the stack: its hidden states."""
            model = model_with(rest, frozen_stack)
            x, prep = prepared(model, micro_k)
            if name == "units" and model.prefix is not None:
                x, _ = model.run_stack("prefix", x, prep.ctx)
            return x

        def first(k, dx=None):
            """Microbatch k's stack input, or (given its cotangent dx) the gradients before the stack."""
            micro_k = jax.tree.map(lambda a: a[k], micros)
            if dx is None:
                return before(rest, micro_k)
            _, vjp = jax.vjp(lambda r: before(r, micro_k), rest)
            return vjp(dx)[0]

        # the blocks' context of every microbatch (RoPE angles, masks: no activations)
        head_model = model_with(rest, frozen_stack)
        ctxs = jax.vmap(lambda micro_k: prepared(head_model, micro_k)[1].ctx)(micros)

        model = model_with(rest, params.get(name, {}))
        # the stack's trainable params (differentiated) and everything else it holds (frozen LoRA
        # base, routing biases, dropout seeds)
        sgraph, sparams, sother = nnx.split(getattr(model, name), nnx.Param, ...)
        sparams, sother = nnx.to_pure_dict(sparams), nnx.to_pure_dict(sother)
        units = jax.tree.leaves((sparams, sother))[0].shape[0]
        per, to_stages, from_stages = stage_layout(units, sched)
        by_stage = lambda tree: jax.tree.map(to_stages, tree)
        active = to_stages(jnp.ones((units,), bool))  # False: the padding units of uneven stages

        def chunk(p, o, x_mb, ctx_mb, on):
            return model.stage_chunk(nnx.merge(sgraph, p, o), x_mb, ctx_mb, on)

        def post(y, record, k):
            """Microbatch k leaving the last stage: its loss, and gradients w.r.t. the parameters
            outside the stack, its hidden states and its stack statistics."""
            stats = jax.tree.map(from_stages, record)  # [S, L, ...] -> [U, ...], layer order
            micro_k = jax.tree.map(lambda a: a[k], micros)

            def scored(rest, h, stats):
                model = model_with(rest, frozen_stack)
                _, prep_k = prepared(model, micro_k)  # its context and labels (the embeddings go unused)
                if name == "units" and model.suffix is not None:
                    h, _ = model.run_stack("suffix", h, prep_k.ctx)
                out = model.finish(h, prep_k, stats if name == "units" else None)
                loss, metrics = objective(out, micro_k, cfg)
                return loss, (metrics, out.loads())

            (loss, aux), (g_rest, dy, dstats) = jax.value_and_grad(scored, argnums=(0, 1, 2), has_aux=True)(
                rest, y, stats
            )
            return loss, aux, g_rest, dy, by_stage(dstats)

        loss, (metrics, loads), g_rest, d_stack = one_f_one_b(
            first, chunk, post, by_stage(sparams), by_stage(sother), active, ctxs, sched
        )
        grads = jax.tree.map(lambda g: g / m_, g_rest)
        if name in params:
            grads[name] = jax.tree.map(lambda d: from_stages(d) / m_, d_stack)
        metrics = {k: (v if k == "tokens" else v / m_) for k, v in metrics.items()}
        return (loss / m_, (metrics, loads)), grads

    return value_and_grad
