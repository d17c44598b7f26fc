"""Tasks (`train.task`): each module here is one kind of training, a plug-in of the one wiring
in run/train.py. A task module has one function,

    prepare(cfg: Config, ctx: TaskContext) -> TaskRun

which builds what is particular to the task (data and loaders, the planned micro-batch, the
model, the loss, the evaluation, what to save and say at the end); `train()` does the rest the
same way for every task (devices, the process group, wrapping, optimizer, checkpoints, resume,
signals, the loop, the report). A new task is a new module here and its name in
`train.task`'s choices (config/sections.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigbatch.config.sections import Config
from bigbatch.engine.batch_schedule import BatchSchedule
from bigbatch.engine.loop import TrainState
from bigbatch.engine.precision import Precision
from bigbatch.engine.step import LossSumFn, lm_loss_sum
from bigbatch.parallel.process_group import DistInfo


@dataclass(frozen=True)
class TaskContext:
    """What a task may use while it prepares: where it runs and how it speaks."""

    dist: DistInfo
    device: torch.device
    precision: Precision
    out_dir: Path
    say: Callable[[str], None]


@dataclass
class TaskRun:
    """A task, prepared: everything train() needs that differs between tasks."""

    cfg: Config                     # resolved: an "auto" micro-batch is planned by now
    schedule: BatchSchedule
    model: nn.Module                # unwrapped, on the device, activation checkpointing applied
    loader: Any                     # next_step(shape) -> micro-batches; state_dict()
    val_batches: Sequence[Any]
    start_lines: list[str]          # printed before training
    save: Callable[[nn.Module, dict[str, torch.Tensor], Path], None]  # rank 0, at the end
    end_lines: Callable[[TrainState], list[str]]  # rank 0, after saving
    loss_sum_fn: LossSumFn = lm_loss_sum
    # Validation metrics ("val_loss" and any others); None: the token-mean loss of val_batches.
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    measure_noise: bool = True      # False where the batch's examples are not independent
    unit: str = "tokens"            # what the schedule and fit()'s `tokens` count ("texts")
    num_parameters: int = 0
    num_trainable_parameters: int = 0  # all of them, or the adapters' (model.adapter)
    flops_per_token: int | None = None  # run_info.json's FLOPs (MFU); None: not counted
    closing_facts: Callable[[], dict[str, Any]] = field(default=lambda: {})  # for run_info


def prepare_task(cfg: Config, ctx: TaskContext) -> TaskRun:
    """The module `bigbatch.run.tasks.<train.task>` prepares the run."""
    module = importlib.import_module(f"{__name__}.{cfg.train.task}")
    return module.prepare(cfg, ctx)
