"""`train_step()`: the one place of gradient arithmetic.

For an optimizer step made of k micro-batches (per rank) it

1. counts the target tokens of the *whole* step, on every rank, and all-reduces that count once,
   before the first backward;
2. for each micro-batch, under DDP's `no_sync` for all but the last (forward and backward both
   inside): forward under autocast (one region for the whole step, so weights are cast once), loss = sum of token losses / the global count (times the world
   size, which undoes DDP's averaging across ranks), backward (scaled under fp16);
3. unscales the gradients, takes their global L2 norm (logged before clipping), clips by value
   and/or by norm, steps the optimizer unless the gradients are non-finite, zeroes the gradients;
4. with 2+ micro-steps, estimates |G|^2 and tr(Sigma) for the gradient noise scale from the first
   micro-batch's gradient (the small batch) and the step's (the big batch): noise_scale.py.

Dividing each micro-batch's *sum* by the global count makes the accumulated gradient exactly the
gradient of the token-mean loss over the whole step, whatever the micro-batches' target counts.
`mean / k` is exact only when every micro-batch holds the same number of targets, which packing
and padding break.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.batch import IGNORE_INDEX, Batch
from bigbatch.engine.noise_scale import unbiased_grad_sq_and_trace
from bigbatch.engine.precision import Precision
from bigbatch.parallel.process_group import (
    SINGLE_PROCESS,
    DistInfo,
    all_reduce_sum,
    maybe_no_sync,
    total_grad_norm,
)

LossSumFn = Callable[[nn.Module, Batch], torch.Tensor]


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `logits` (..., vocab) over the unmasked `targets` (...)."""
    # Upcast bf16/fp16 logits to fp32, but never downcast a float64 model (the --float64 check).
    softmax_dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.flatten(0, -2).to(softmax_dtype), targets.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss_sum(model: nn.Module, batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the unmasked targets (softmax in fp32 or wider)."""
    output = model(**batch.model_inputs())
    logits = getattr(output, "logits", output)  # a Hugging Face model returns a ModelOutput
    return token_loss_sum(logits, batch.targets)


@dataclass
class StepStats:
    """What one train_step did: the exact loss, the gradient norm, skipped or not, ..."""

    loss: torch.Tensor         # exact token-mean loss of the whole step, all ranks (0-dim)
    grad_norm: torch.Tensor    # global L2 norm of the unscaled gradients, before clipping
    num_targets: torch.Tensor  # target tokens in the step, all ranks
    skipped: bool              # True when the gradients were non-finite and no update was made
    loss_scale: float          # fp16 loss scale after this step (1.0 when not scaling)
    # [|G|^2, tr(Sigma)] estimates for the noise scale (noise_scale.py), averaged over ranks;
    # None with one micro-step per rank (no small batch to compare with) or under FSDP.
    noise: torch.Tensor | None = None


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[Batch], *, precision: Precision,
               clip_norm: float = 0.0, clip_value: float = 0.0,
               dist: DistInfo = SINGLE_PROCESS, loss_sum_fn: LossSumFn = lm_loss_sum,
               measure_noise: bool = True) -> StepStats:
    """One optimizer step over `micro_batches` (this rank's share of the global batch).
    `measure_noise=False` skips the noise-scale estimate (for batches whose examples are not
    independent samples, e.g. overlapping windows of one text)."""
    micro_targets = torch.stack([mb.num_targets() for mb in micro_batches])
    num_targets = all_reduce_sum(micro_targets.sum(), dist)
    # DDP averages gradients over ranks; multiplying by world_size turns that into the sum
    # of every rank's (sum / global count), the exact global token mean.
    normaliser = num_targets.clamp(min=1).double() / dist.world_size

    loss_sum = torch.zeros((), dtype=torch.float64, device=num_targets.device)
    last = len(micro_batches) - 1
    # FSDP2 keeps no_sync gradients in internal unsharded buffers, not in .grad: no small batch.
    measure_noise = measure_noise and last > 0 and not hasattr(model, "set_requires_gradient_sync")
    small_grad_sq = None
    # One autocast region around all k micro-steps: autocast casts each weight to bf16/fp16
    # once and reuses the cast until the region exits, so the weights are cast once per
    # optimizer step, not once per micro-step (the weights do not change in between).
    # Backward runs with autocast off, as it would outside the region.
    with precision.autocast():
        for i, micro_batch in enumerate(micro_batches):
            with maybe_no_sync(model, enabled=i < last):
                micro_loss_sum = loss_sum_fn(model, micro_batch)
                loss = micro_loss_sum / normaliser.to(micro_loss_sum.dtype)
                with precision.outside_autocast():
                    precision.scaler.scale(loss).backward()
            loss_sum += micro_loss_sum.detach().double()
            if i == 0 and measure_noise:  # the first micro-batch's own gradient, before any sync
                with precision.outside_autocast():
                    small_grad_sq = _grad_sq(model)

    params = [p for p in model.parameters() if p.grad is not None]
    if precision.scaling:
        precision.scaler.unscale_(optimizer)
    grad_norm = total_grad_norm([p.grad for p in params])
    noise = None
    if small_grad_sq is not None:
        noise = _noise_estimates(small_grad_sq, micro_targets[0], grad_norm, num_targets,
                                 normaliser, precision, dist)
    # The step's one host sync: whether to update at all depends on it.
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        if clip_value > 0:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        if clip_norm > 0:
            # Value clipping changed the gradients, so their norm must be taken again.
            norm_now = total_grad_norm([p.grad for p in params]) if clip_value > 0 else grad_norm
            torch.nn.utils.clip_grads_with_norm_(params, clip_norm, norm_now)
        if precision.scaling:
            precision.scaler.step(optimizer)
        else:
            optimizer.step()
    if precision.scaling:
        precision.scaler.update()  # backs the scale off after an overflow, grows it otherwise
    optimizer.zero_grad(set_to_none=True)

    loss = all_reduce_sum(loss_sum, dist) / num_targets.clamp(min=1)
    return StepStats(loss=loss, grad_norm=grad_norm.detach(), num_targets=num_targets,
                     skipped=not finite, noise=noise,
                     loss_scale=precision.scaler.get_scale() if precision.scaling else 1.0)


def _grad_sq(model: nn.Module) -> torch.Tensor:
    return total_grad_norm([p.grad for p in model.parameters() if p.grad is not None]) ** 2


def _noise_estimates(small_grad_sq: torch.Tensor, small_targets: torch.Tensor,
                     grad_norm: torch.Tensor, num_targets: torch.Tensor,
                     normaliser: torch.Tensor, precision: Precision, dist: DistInfo
                     ) -> torch.Tensor:
    """Rescale the first micro-batch's gradient (loss sum / normaliser, times the fp16 loss
    scale) to its own token mean, then estimate |G|^2 and tr(Sigma) on this rank and average over
    ranks: one 2-element all-reduce. The big batch is the whole step (global token mean)."""
    # get_scale() is a host sync, but only under fp16 and outside the micro-step loop.
    loss_scale = precision.scaler.get_scale() if precision.scaling else 1.0
    # The true sizes, never rounded up: a classification batch's size is its weight sum. An
    # empty small batch (a rank's filler micro-batch) has no gradient to compare: NaN, which
    # the all-reduce spreads to every rank and NoiseScaleEMA.update skips.
    small_size = small_targets.double()
    to_token_mean = normaliser.double() / small_size / loss_scale
    estimates = unbiased_grad_sq_and_trace(small_grad_sq.double() * to_token_mean ** 2,
                                           small_size, grad_norm.double() ** 2,
                                           num_targets.double())
    estimates = torch.where(small_size > 0, estimates, torch.full_like(estimates, float("nan")))
    return all_reduce_sum(estimates, dist) / dist.world_size
