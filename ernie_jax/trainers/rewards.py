"""Rewards of sampled answers, computed on the host: built-in verifiers and user functions.

Verifiers score the answer part of a completion (the text after a closing `</think>` when the model
thinks first): `exact` (string equality after trimming), `numeric` (the last number in the answer
within `tolerance` of the reference), `regex` (the answer matches `rl.format_regex`). On top of any of
them: `rl.format_weight` x (the whole completion matches `rl.format_regex`) and minus
`rl.length_penalty` per token beyond `rl.length_target`. A sample's own `"reward": {"type": ...,
"tolerance": ...}` overrides the run's verifier for that prompt.

A user function (`rl.reward: mypkg.rewards:score`) is called once per rollout on lists
`(prompts, completions, samples)` and returns one float per completion. It is imported and probed
before any compute (one-line errors); during the run an exception or a wrong return counts as a
failure (`reward_failures`), scores those completions 0 and never stops the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from typing import Callable

from ernie_jax.config import Config
from ernie_jax.errors import ConfigError

BUILT_IN = ("exact", "numeric", "regex")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answer_text(completion: str) -> str:
    """What a completion answers: the text after its last `</think>`, trimmed."""
    return completion.rsplit("</think>", 1)[-1].strip()


def exact(completion: str, answer, **_) -> float:
    return float(answer is not None and answer_text(completion) == str(answer).strip())


def numeric(completion: str, answer, tolerance: float = 0.0, **_) -> float:
    found = NUMBER.findall(answer_text(completion))
    if not found or answer is None:
        return 0.0
    try:
        return float(abs(float(found[-1]) - float(answer)) <= tolerance)
    except ValueError:
        return 0.0


def regex(completion: str, answer, pattern: str = "", **_) -> float:
    return float(bool(pattern) and re.fullmatch(pattern, answer_text(completion), re.S) is not None)


VERIFIERS: dict[str, Callable[..., float]] = {"exact": exact, "numeric": numeric, "regex": regex}


@dataclasses.dataclass
class Scores:
    rewards: list[float]
    correct: list[float] | None  # verifiable rewards: 1 where the verifier accepted the answer
    failures: int = 0


def load_user_function(spec: str) -> Callable:
    """`module.path:function`, imported; one line naming the problem when it cannot be."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"rl.reward={spec!r}: use one of {BUILT_IN} or 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rl.reward={spec!r} cannot be imported ({e}); check the module path") from None
    if not callable(fn):
        raise ConfigError(f"rl.reward={spec!r} is not a function")
    return fn


class RewardModel:
    """The run's reward: `score(prompts, completions, samples, lengths) -> Scores`."""

    def __init__(self, cfg: Config, probe_samples: list[dict] | None = None):
        rl = cfg.rl
        self.rl = rl
        self.user = None if rl.reward in BUILT_IN else load_user_function(rl.reward)
        if self.user is not None and probe_samples:
            # before any compute: the function runs and returns one number per completion
            probe = (probe_samples * 2)[:2]  # two completions: a scalar or a single value is caught
            texts = [str(s.get("answer", "")) for s in probe]
            try:
                got = self._call_user([s["text"] for s in probe], texts, probe)
            except Exception as e:  # noqa: BLE001 - any failure of the user's code, named in one line
                raise ConfigError(
                    f"rl.reward={rl.reward} fails on the first prompts: {type(e).__name__}: {e}"
                ) from None
            if got is None:
                raise ConfigError(
                    f"rl.reward={rl.reward} must return one float per completion (a list of {len(probe)} "
                    f"for {len(probe)} completions)"
                )

    def _call_user(self, prompts, completions, samples) -> list[float] | None:
        out = self.user(prompts, completions, samples)
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            return None
        if len(values) != len(completions) or not all(math.isfinite(v) for v in values):
            return None
        return values

    def score(
        self, prompts: list[str], completions: list[str], samples: list[dict], lengths: list[int]
    ) -> Scores:
        rl = self.rl
        failures, correct = 0, None
        if self.user is None:
            base = []
            for c, s in zip(completions, samples):
                spec = dict(s.get("reward") or {})
                kind = spec.pop("type", rl.reward)
                kw = {"tolerance": rl.reward_tolerance, "pattern": rl.format_regex, **spec}
                base.append(VERIFIERS[kind](c, s.get("answer"), **kw))
            correct = list(base)
        else:
            try:
                base = self._call_user(prompts, completions, samples)
            except Exception:  # noqa: BLE001 - the user's code: counted, never fatal
                base = None
            if base is None:
                failures, base = len(completions), [0.0] * len(completions)
        rewards = []
        for r, c, n in zip(base, completions, lengths):
            if rl.format_weight and rl.format_regex:
                r += rl.format_weight * float(re.fullmatch(rl.format_regex, c.strip(), re.S) is not None)
            if rl.length_penalty:
                r -= rl.length_penalty * max(0, n - rl.length_target)
            rewards.append(float(r))
        return Scores(rewards, correct, failures)
