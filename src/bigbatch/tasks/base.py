"""What every task is and gets: the `Task` it declares (its answers to what the other rooms ask),
the `TaskContext` it prepares in, and the `TaskRun` it hands to `train()`.

A task (`train.task`) is one folder of tasks/: its data, its loss, its wiring, and a `Task`
object in its `__init__.py` that the planner, the report, the tools and `bigbatch config` ask
instead of comparing `train.task` with a name (tests/unit/test_layout.py enforces that). Its
`prepare(cfg, ctx)` builds what is particular to it (data and loaders, the model, the loss, the
evaluation, what to save and say at the end); `train()` (run/train.py) does the rest the same way
for every task (devices, the process group, wrapping, optimizer, checkpoints, resume, signals,
the loop, the report). A new task is a new folder here, its `Task` in tasks/__init__.py's
registry and its name in `train.task`'s choices (config/sections.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from bigbatch.batch import StepLoader
from bigbatch.config.sections import Config
from bigbatch.engine.batch_schedule import BatchSchedule
from bigbatch.engine.loop import TrainState
from bigbatch.engine.precision import Precision
from bigbatch.engine.step import LossSumFn
from bigbatch.parallel.process_group import DistInfo


class Task(Protocol):
    """A kind of training, as the rest of the house sees it. Cheap to import: what needs torch
    or the task's data is imported inside the methods."""

    name: str                      # its `train.task`
    unit: str                      # what its schedule and fit()'s `tokens` count: tokens, texts
    model_head: str                # the Hugging Face head it trains (model/hf.py HEADS)
    verifiable: bool               # `bigbatch verify` checks it (the built-in GPT on it)
    measures_critical_batch: bool  # `bigbatch cbs` and rank advice apply (a token batch)
    probe_labels: list[str] | None  # the labels of the planner's probe model (a classifier's)

    def prepare(self, cfg: Config, ctx: TaskContext) -> TaskRun:
        """Data, model, loss, evaluation and what to save: everything train() needs."""

    def describe_batch(self, cfg: Config, world_size: int) -> list[str]:
        """`bigbatch config`'s lines on the batch arithmetic at `world_size` ranks."""

    def planning_config(self, cfg: Config) -> Config:
        """The config the memory planner plans: a batch of `data.seq_len`-token sequences
        (a classification task plans full windows of `data.max_length`)."""

    def probe_loss_sum(self) -> LossSumFn:
        """The loss the planner's probe of a Hugging Face model measures."""

    def probe_batch(self, vocab_size: int, rows: int, seq_len: int, device: torch.device) -> Any:
        """A random micro-batch of `rows` x `seq_len` tokens for the planner's probe."""


@dataclass(frozen=True)
class TaskContext:
    """What a task may use while it prepares: where it runs, how it speaks, and the memory
    planner (`plan_micro_batch(cfg, vocab_size, data_bytes)` -> cfg with the planned micro-batch
    for `batch.micro_batch_size = "auto"`; run/train.py passes the planner in, which sits above
    the tasks because it asks them how to probe)."""

    dist: DistInfo
    device: torch.device
    precision: Precision
    out_dir: Path
    say: Callable[[str], None]
    plan_micro_batch: Callable[[Config, int, int], Config]


@dataclass
class TaskRun:
    """A task, prepared: everything train() needs that differs between tasks."""

    cfg: Config                     # resolved: an "auto" micro-batch is planned by now
    schedule: BatchSchedule
    model: nn.Module                # unwrapped, on the device, activation checkpointing applied
    loader: StepLoader              # this rank's micro-batches of each step (batch.py)
    start_lines: list[str]          # printed before training
    save: Callable[[nn.Module, dict[str, torch.Tensor], Path], None]  # rank 0, at the end
    end_lines: Callable[[TrainState], list[str]]  # rank 0, after saving
    loss_sum_fn: LossSumFn
    # The validation metrics ("val_loss" and any others) of the model, over all ranks.
    evaluate: Callable[[nn.Module], dict[str, float]]
    measure_noise: bool = True      # False where the batch's examples are not independent
    num_parameters: int = 0
    num_trainable_parameters: int = 0  # all of them, or the adapters' (model.adapter)
    flops_per_token: int | None = None  # run_info.json's FLOPs (MFU); None: not counted
    closing_facts: Callable[[], dict[str, Any]] = field(default=lambda: {})  # for run_info


def hold_out(num_texts: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of `num_texts` texts or rows: a seeded random `fraction` held
    out (at least one), for a task whose data has no validation file."""
    order = np.random.default_rng(seed).permutation(num_texts)
    num_val = max(1, round(num_texts * fraction))
    return np.sort(order[num_val:]), np.sort(order[:num_val])
