"""What a trainer hands the shared loop and step: its data, objective, metrics and extra state.

A new trainer (SFT, DPO, LoRA-SFT, UPO) is a function `cfg -> Task`; the loop (`loop.py`) and the
step (`step.py`) never learn its name. Hooks, all optional:

- `init_state(state) -> dict`: entries the trainer adds to a fresh train state (DPO: a frozen copy of
  the starting params). Called after init and again after `init_from`; a resumed run restores them
  from the checkpoint instead.
- `batch_inputs(forward, state, micro) -> micro`: inside jit, before the objective: extra inputs
  computed from the state (DPO: the reference model's log-probs). `forward(params, batch)` runs the
  model with the current buffers.
- `prepare(graphdef, state, mesh, workdir, fresh) -> dict`: host side, once the model exists and
  before the first step; returns Task fields to replace (DPO with a cached reference builds its
  iterators here, after one pass of the starting model over the data).
- `next_batch(state) -> batch`: host side, before each step: the step's batch [A, B, ...] built from
  the current state (RL: answers sampled from the current policy). Without it the loop draws from
  `train_iter`, which still carries the data state a checkpoint saves.
- `evaluate(graphdef, state) -> dict`: host side, at each eval: metrics of the task's own (RL:
  held-out accuracy of greedy answers), logged with the eval split's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator


@dataclasses.dataclass(frozen=True)
class EvalReport:
    """How eval batches are summarised: `means` maps each reported metric to the metric that weights
    it across batches (tokens for per-token losses, pairs for preference pairs); `loss` is the one
    reported as eval_loss, with a perplexity only when it is a per-token loss (`per_token`)."""

    means: tuple[tuple[str, str], ...] = (("lm_loss", "tokens"),)
    loss: str = "lm_loss"
    per_token: bool = True

    def keys(self) -> tuple[str, ...]:
        """The metrics an eval step returns for this report (each mean and its weight)."""
        return tuple(dict.fromkeys(k for pair in self.means for k in pair))


@dataclasses.dataclass
class Task:
    objective: Callable  # (model output, batch, cfg) -> (loss, named scalars)
    train_iter: Any  # grain iterator with get_state/set_state, yields micro-batches
    eval_batches: Callable[[], Iterator] | None
    vocab_size: int
    description: str
    stats: Any = None  # data-side counters (skipped samples), logged with metrics
    extra_evals: dict = dataclasses.field(
        default_factory=dict
    )  # name -> eval batch factory, logged name_loss
    eval_report: EvalReport = EvalReport()
    # named held-out sources (data.eval_source): name -> eval batch factory, logged eval/<name>/...
    eval_sources: dict = dataclasses.field(default_factory=dict)
    tokenizer: Any = None  # bits per byte of evals and sampled prompts need it
    init_state: Callable[[dict], dict] | None = None
    batch_inputs: Callable[[Callable, dict, dict], dict] | None = None
    prepare: Callable[..., dict] | None = None
    next_batch: Callable[[dict], dict] | None = None
    evaluate: Callable[[Any, dict], dict] | None = None
