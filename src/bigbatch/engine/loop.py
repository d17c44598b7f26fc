"""`fit()`: the training loop, on one screen. Everything it calls is passed in."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from bigbatch.batch import MicroBatch, StepLoader
from bigbatch.config.sections import Config
from bigbatch.engine.batch_schedule import BatchSchedule
from bigbatch.engine.metrics import MetricsLog, Progress, peak_memory_bytes
from bigbatch.engine.noise_scale import NoiseScaleEMA
from bigbatch.engine.precision import Precision
from bigbatch.engine.step import LossSumFn, lm_loss_sum, train_step
from bigbatch.errors import UsageError
from bigbatch.optim.schedule import set_learning_rates
from bigbatch.parallel.process_group import DistInfo, all_reduce_sum


@dataclass
class TrainState:
    """What the loop itself carries from step to step (checkpointed with everything else)."""

    step: int = 0                 # optimizer steps taken
    tokens_seen: int = 0          # training tokens consumed, all ranks
    skipped_steps: int = 0        # steps whose update was skipped (non-finite gradients)
    bad_steps_in_row: int = 0
    last_val_loss: float | None = None
    reached_target: bool = False  # train.target_val_loss was reached: the run is done
    batch_tokens: int = 0         # the last step's global batch (an auto ramp never shrinks it)
    steps_at_batch: int = 0       # steps in a row at batch_tokens (an auto ramp's hold)
    first_batch_tokens: int = 0   # the first step's global batch (what a ramp grew from)
    noise: NoiseScaleEMA = field(default_factory=NoiseScaleEMA)  # gradient noise scale

    def state_dict(self) -> dict[str, Any]:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "noise"}
        return {**plain, "noise": self.noise.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key == "micro_steps":  # older checkpoints: per rank, of an unknown world size
                continue
            if key == "noise":
                self.noise.load_state_dict(value)
            else:
                setattr(self, key, value)


def previous_micro_steps(state: TrainState, schedule: BatchSchedule) -> int:
    """The last step's batch in this run's micro-steps per rank, rounded up: the ramp's state is
    kept in global tokens, so a run resumed at another world size keeps its batch."""
    return -(-state.batch_tokens // schedule.unit_tokens)


def finished(state: TrainState, schedule: BatchSchedule) -> bool:
    return state.reached_target or state.tokens_seen >= schedule.total_tokens


def noise_metrics(noise: NoiseScaleEMA) -> dict[str, float]:
    """gns_grad_sq and gns_trace (the moving averages) and gns_tokens (their ratio, B_simple),
    once they exist."""
    row = {}
    if noise.count:
        row = {"gns_grad_sq": noise.grad_sq, "gns_trace": noise.trace}
    if noise.noise_scale is not None:
        row["gns_tokens"] = noise.noise_scale
    return row


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[MicroBatch], precision: Precision,
             dist: DistInfo, device: torch.device, loss_sum_fn: LossSumFn = lm_loss_sum) -> float:
    """Exact token-mean validation loss over the fixed validation set, all ranks."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # [loss sum, target count]
    with precision.autocast():  # one region: each weight is cast once for the whole evaluation
        for batch in batches:
            batch = batch.to(device)
            totals[0] += loss_sum_fn(model, batch).double()
            totals[1] += batch.num_targets()
    model.train()
    all_reduce_sum(totals, dist)
    return float(totals[0] / totals[1].clamp(min=1))  # host sync: evaluation is a logging point


@dataclass(frozen=True)
class StepSetup:
    """How every optimizer step is taken: what fit() hands to train_step() and evaluation."""

    precision: Precision
    dist: DistInfo
    device: torch.device
    loss_sum_fn: LossSumFn
    measure_noise: bool = True  # False when the batch's examples are not independent samples


@dataclass(frozen=True)
class LoopHooks:
    """What fit() calls out to: the validation metrics (with "val_loss") of the model, the
    metrics log and progress line, and after each step the checkpointer and the stop check."""

    evaluate: Callable[[nn.Module], dict[str, float]]
    log: MetricsLog
    progress: Progress
    on_step_end: Callable[[TrainState], None] = lambda state: None
    should_stop: Callable[[], bool] = lambda: False


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, loader: StepLoader,
        state: TrainState, *, cfg: Config, schedule: BatchSchedule, setup: StepSetup,
        hooks: LoopHooks) -> TrainState:
    """Train for `train.max_steps` full batches of tokens, or until `train.target_val_loss`:

        evaluate the untrained model (a fresh run)
        for each optimizer step:
            its shape: global batch (ramp), sequence length (warmup); see batch_schedule.py
            each parameter group's lr: its base lr scaled to the batch, at the step's last
                token on the schedule (set_learning_rates; the first group's is logged)
            take this rank's micro-batches of the step
            train_step(): accumulate exact gradients, clip, update; noise-scale estimates
            update the noise-scale averages; log loss, lr, grad norm, gns_*, tokens/s (rank 0)
            every `eval_every` steps and at the end: hooks.evaluate (stop at the target)
            hooks.on_step_end(state): checkpoints; stop early if hooks.should_stop()
    """
    full_tokens, target = schedule.full_batch.global_tokens, cfg.train.target_val_loss
    log, progress = hooks.log, hooks.progress
    if state.step == 0:  # the untrained model's loss: the baseline every curve starts from
        metrics = hooks.evaluate(model)
        state.last_val_loss = metrics["val_loss"]
        log.write({"step": 0, "tokens": 0, **metrics})
    while not finished(state, schedule):
        started = time.perf_counter()
        shape = schedule.shape(state.tokens_seen, state.noise.noise_scale,
                               previous_micro_steps(state, schedule), state.steps_at_batch)
        lr = set_learning_rates(optimizer, cfg.optim, batch_tokens=shape.global_tokens,
                                tokens_end=state.tokens_seen + shape.global_tokens,
                                full_batch_tokens=full_tokens, max_steps=cfg.train.max_steps)
        micro_batches = [mb.to(setup.device) for mb in loader.next_step(shape)]
        stats = train_step(model, optimizer, micro_batches, precision=setup.precision,
                           clip_norm=cfg.optim.clip_norm, clip_value=cfg.optim.clip_value,
                           dist=setup.dist, loss_sum_fn=setup.loss_sum_fn,
                           measure_noise=setup.measure_noise)
        state.step += 1
        state.tokens_seen += shape.global_tokens
        state.steps_at_batch = (state.steps_at_batch + 1
                                if shape.global_tokens == state.batch_tokens else 1)
        state.batch_tokens = shape.global_tokens
        state.first_batch_tokens = state.first_batch_tokens or shape.global_tokens
        # The schedule counts the task's unit (a classifier's: texts); the loader counts the
        # step's real tokens (a classifier's vary with its texts' lengths), for tokens/s.
        step_tokens = loader.last_step_tokens
        state.skipped_steps += stats.skipped
        state.bad_steps_in_row = state.bad_steps_in_row + 1 if stats.skipped else 0
        if stats.noise is not None and not stats.skipped:
            state.noise.update(*stats.noise.tolist())  # host sync: once per step, as the loss
        seconds = time.perf_counter() - started
        loss = float(stats.loss)  # host sync: logging point, once per optimizer step
        row = {"step": state.step, "tokens": state.tokens_seen, "loss": loss, "lr": lr,
               "grad_norm": float(stats.grad_norm), "tokens_per_s": step_tokens / seconds,
               "global_tokens": shape.global_tokens, "seq_len": shape.seq_len,
               "micro_batch_size": shape.micro_batch_size,
               "num_micro_steps": len(micro_batches), "step_seconds": seconds,
               "skipped_steps": state.skipped_steps,
               "peak_memory_bytes": peak_memory_bytes(setup.device), **noise_metrics(state.noise)}
        if setup.precision.scaling:
            row["loss_scale"] = stats.loss_scale
        log.write(row)
        progress.update(state.step, loss, row["tokens_per_s"], lr)
        if state.bad_steps_in_row >= cfg.train.max_bad_steps:
            raise UsageError(f"{state.bad_steps_in_row} optimizer steps in a row had non-finite "
                             f"gradients (train.max_bad_steps = {cfg.train.max_bad_steps}): "
                             "lower optim.lr, use bf16, or check the data")
        every = cfg.train.eval_every
        if (every and state.step % every == 0) or finished(state, schedule):
            metrics = hooks.evaluate(model)
            state.last_val_loss = metrics["val_loss"]
            log.write({"step": state.step, "tokens": state.tokens_seen, **metrics})
            progress.message(f"step {state.step}: " + " | ".join(
                f"{key} {value:.4f}" for key, value in metrics.items()))
            state.reached_target = bool(target) and state.last_val_loss <= target
        hooks.on_step_end(state)
        if hooks.should_stop():
            break
    return state
