"""`fit()`: the training loop, on one screen. Everything it calls is passed in."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bigbatch.batching import BatchPlan
from bigbatch.config import Config
from bigbatch.data.loader import MicroBatch, TokenLoader
from bigbatch.distributed import DistInfo, all_reduce_sum
from bigbatch.engine.schedule import learning_rate
from bigbatch.engine.step import LossSumFn, lm_loss_sum, train_step
from bigbatch.errors import UsageError
from bigbatch.metrics import MetricsLog, Progress, peak_memory_bytes
from bigbatch.precision import Precision


@dataclass
class TrainState:
    """What the loop itself carries from step to step (checkpointed with everything else)."""

    step: int = 0                 # optimizer steps taken
    tokens_seen: int = 0          # training tokens consumed, all ranks
    skipped_steps: int = 0        # steps whose update was skipped (non-finite gradients)
    bad_steps_in_row: int = 0
    last_val_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


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


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, loader: TokenLoader,
        val_batches: Sequence[MicroBatch], *, cfg: Config, plan: BatchPlan, precision: Precision,
        dist: DistInfo, device: torch.device, state: TrainState, log: MetricsLog,
        progress: Progress, should_stop: Callable[[], bool] = lambda: False,
        on_step_end: Callable[[TrainState], None] = lambda state: None,
        loss_sum_fn: LossSumFn = lm_loss_sum) -> TrainState:
    """Train until `train.max_steps`:

        for each optimizer step:
            set the learning rate from the schedule (a pure function of the step)
            take this rank's micro-batches of the next global batch
            train_step(): accumulate exact gradients, clip, update
            log loss, lr, grad norm, tokens/s (rank 0)
            every `eval_every` steps and at the end: validation loss
            on_step_end(state): checkpoints; stop early if asked to
    """
    opt = cfg.optim
    if state.step == 0:  # the untrained model's loss: the baseline every curve starts from
        state.last_val_loss = evaluate(model, val_batches, precision, dist, device,
                                       loss_sum_fn)
        log.write({"step": 0, "tokens": 0, "val_loss": state.last_val_loss})
    while state.step < cfg.train.max_steps:
        started = time.perf_counter()
        lr = learning_rate(state.step, peak_lr=opt.lr, warmup_steps=opt.warmup_steps,
                           total_steps=cfg.train.max_steps, decay=opt.decay,
                           min_lr_ratio=opt.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_batches = [mb.to(device) for mb in loader.next_step()]
        stats = train_step(model, optimizer, micro_batches, precision=precision,
                           clip_norm=opt.clip_norm, clip_value=opt.clip_value, dist=dist,
                           loss_sum_fn=loss_sum_fn)
        state.step += 1
        state.tokens_seen += plan.global_tokens
        state.skipped_steps += stats.skipped
        state.bad_steps_in_row = state.bad_steps_in_row + 1 if stats.skipped else 0
        seconds = time.perf_counter() - started
        loss = float(stats.loss)  # host sync: logging point, once per optimizer step
        row = {"step": state.step, "tokens": state.tokens_seen, "loss": loss, "lr": lr,
               "grad_norm": float(stats.grad_norm), "tokens_per_s": plan.global_tokens / seconds,
               "micro_batch_size": plan.micro_batch_size,
               "num_micro_steps": plan.num_micro_steps, "step_seconds": seconds,
               "skipped_steps": state.skipped_steps,
               "peak_memory_bytes": peak_memory_bytes(device)}
        if precision.scaling:
            row["loss_scale"] = stats.loss_scale
        log.write(row)
        progress.update(state.step, loss, row["tokens_per_s"], lr)
        if state.bad_steps_in_row >= cfg.train.max_bad_steps:
            raise UsageError(f"{state.bad_steps_in_row} optimizer steps in a row had non-finite "
                             f"gradients (train.max_bad_steps = {cfg.train.max_bad_steps}): "
                             "lower optim.lr, use bf16, or check the data")
        every = cfg.train.eval_every
        if (every and state.step % every == 0) or state.step == cfg.train.max_steps:
            state.last_val_loss = evaluate(model, val_batches, precision, dist, device,
                                           loss_sum_fn)
            log.write({"step": state.step, "tokens": state.tokens_seen,
                       "val_loss": state.last_val_loss})
            progress.message(f"step {state.step}: val_loss {state.last_val_loss:.4f}")
        on_step_end(state)
        if should_stop():
            break
    return state
