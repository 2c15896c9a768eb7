"""`data.kind` -> the trainer's task: the one table the CLI and the stage recipe read."""

from __future__ import annotations

from typing import Callable

from ernie_jax.config import Config
from ernie_jax.trainers.dpo import dpo_task
from ernie_jax.trainers.eval_sources import with_eval_sources
from ernie_jax.trainers.pretrain import multimodal_pretraining_task, text_pretraining_task
from ernie_jax.trainers.rl import rl_task
from ernie_jax.trainers.sft import sft_task
from ernie_jax.trainers.task import Task

TASKS: dict[str, Callable[[Config], Task]] = {
    "text": text_pretraining_task,  # packed text, LM objective
    "multimodal": multimodal_pretraining_task,  # packed image-text, LM objective on text targets
    "chat": sft_task,  # chats, loss on assistant tokens
    "preference": dpo_task,  # preference pairs, DPO / IPO / hinge
    "prompts": rl_task,  # prompts, answers sampled from the policy: GRPO / UPO
}


def task_for(cfg: Config) -> Task:
    """The task `cfg.data.kind` names, with the held-out sources of data.eval_source."""
    return with_eval_sources(cfg, TASKS[cfg.data.kind](cfg))
