"""The tasks (`train.task`), each one folder: lm/ (language modelling), classify/ (sequence
classification) and sft/ (supervised fine-tuning of a causal LM). `task_of(cfg)` is how any other room asks about the task of a run (tasks/base.py
says what a task answers); no module outside tasks/ compares `train.task` with a name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bigbatch.errors import UsageError
from bigbatch.tasks.classify import CLASSIFY
from bigbatch.tasks.lm import LM
from bigbatch.tasks.sft import SFT

if TYPE_CHECKING:
    from bigbatch.config.sections import Config
    from bigbatch.tasks.base import Task

TASKS: dict[str, Task] = {task.name: task for task in (LM, CLASSIFY, SFT)}


def task_named(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"train.task = {name!r} is not a task: one of {', '.join(TASKS)}")
    return TASKS[name]


def task_of(cfg: Config) -> Task:
    """The task of a run's config (`train.task`)."""
    return task_named(cfg.train.task)
