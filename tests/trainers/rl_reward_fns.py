"""Reward functions the RL tests name by dotted path (rl.reward=tests.trainers.rl_reward_fns:...)."""


def shortness(prompts, completions, samples):
    """1 for an empty answer, falling with its length: a reward any policy can chase."""
    return [1.0 / (1.0 + len(c)) for c in completions]


def wrong_shape(prompts, completions, samples):
    return [1.0]


def broken(prompts, completions, samples):
    raise RuntimeError("the grader is down")


calls = {"n": 0}


def flaky(prompts, completions, samples):
    """Fine on the start-up probe, then fails on every other call."""
    calls["n"] += 1
    if calls["n"] > 1 and calls["n"] % 2 == 0:
        raise RuntimeError("timeout")
    return [0.5] * len(completions)
