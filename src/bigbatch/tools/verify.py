"""`bigbatch verify`: accumulation checked on the user's own model and data.

The gradients that `train_step` hands to the optimizer after k micro-steps are compared with one
forward/backward over the same samples at once. The error of a tensor is max|acc - ref| / max|ref|
(relative to the tensor's scale, so near-zero elements do not blow it up); the check reports the
largest over all tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bigbatch.batch import divisors, sequences_per_rank, split_batch
from bigbatch.config.sections import Config, PrecisionConfig
from bigbatch.data.corpus import prepare_corpus
from bigbatch.data.loader import TokenLoader
from bigbatch.engine.precision import make_precision
from bigbatch.engine.seeding import seed_everything
from bigbatch.engine.step import LossSumFn, lm_loss_sum, train_step
from bigbatch.errors import UsageError
from bigbatch.tasks import task_of
from bigbatch.tasks.lm.wiring import build_model


class GradientRecorder(torch.optim.Optimizer):
    """An 'optimizer' whose step() records the gradients it was handed and changes nothing."""

    def __init__(self, params) -> None:
        super().__init__(list(params), defaults={})
        self.recorded: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - the Optimizer interface
        self.recorded = [p.grad.detach().clone() for group in self.param_groups
                         for p in group["params"]]


def concatenate(micro_batches: Sequence[Any]) -> Any:
    """One batch of all the micro-batches' samples: every tensor field (of a dataclass such as
    MicroBatch, or of a dict) concatenated along dim 0. Fields must agree beyond dim 0."""
    first = micro_batches[0]
    if isinstance(first, dict):
        return {key: torch.cat([mb[key] for mb in micro_batches]) for key in first}
    if dataclasses.is_dataclass(first):
        return dataclasses.replace(first, **{
            f.name: torch.cat([getattr(mb, f.name) for mb in micro_batches])
            for f in dataclasses.fields(first) if isinstance(getattr(first, f.name), torch.Tensor)})
    raise UsageError(f"cannot concatenate micro-batches of type {type(first).__name__}: pass "
                     "merge= (a function that makes one batch of them)")


def reference_gradients(model: nn.Module, micro_batches: Sequence[Any],
                        loss_sum_fn: LossSumFn = lm_loss_sum,
                        merge: Callable[[Sequence[Any]], Any] = concatenate
                        ) -> list[torch.Tensor]:
    """One forward/backward over all samples at once, the loss their exact mean."""
    model.zero_grad(set_to_none=True)
    batch = merge(micro_batches)
    (loss_sum_fn(model, batch) / batch.num_targets()).backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def accumulated_gradients(model: nn.Module, micro_batches: Sequence[Any],
                          loss_sum_fn: LossSumFn = lm_loss_sum) -> list[torch.Tensor]:
    """The gradients train_step passes to the optimizer (no clipping, no scaling)."""
    recorder = GradientRecorder(p for p in model.parameters() if p.requires_grad)
    device = next(model.parameters()).device
    precision = make_precision(PrecisionConfig(dtype="fp32"), device)
    train_step(model, recorder, micro_batches, precision=precision, loss_sum_fn=loss_sum_fn,
               measure_noise=False)
    return recorder.recorded


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        scale = e.abs().max().clamp(min=torch.finfo(e.dtype).tiny)
        worst = max(worst, float((a - e).abs().max() / scale))
    return worst


@dataclass
class VerifyResult:
    """How far accumulated gradients were from one big batch's, and whether that passes."""

    max_relative_error: float
    tolerance: float
    num_micro_steps: int
    micro_batch_size: int
    target_counts: list[float]     # of each micro-batch (tokens, or texts' weights)
    dtype: str

    @property
    def passed(self) -> bool:
        return self.max_relative_error <= self.tolerance


def checkable_micro_batch(cfg: Config, world_size: int, max_micro_batch: int) -> Config:
    """`batch.micro_batch_size = "auto"` has no size until the planner runs; the check only needs
    a size that divides the per-rank batch, so take the largest one up to `max_micro_batch`."""
    if cfg.batch.micro_batch_size != "auto":
        return cfg
    per_rank = sequences_per_rank(cfg.batch.global_tokens, cfg.data.seq_len, world_size)
    size = max(divisors(per_rank, max_micro_batch))
    return dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, micro_batch_size=size))


def verify(model: nn.Module, micro_batches: Sequence[Any], *,
           loss_sum_fn: LossSumFn = lm_loss_sum,
           merge: Callable[[Sequence[Any]], Any] = concatenate,
           tolerance: float | None = None) -> VerifyResult:
    """Check, on your own model and micro-batches, that `train_step`'s accumulated gradients
    equal one forward/backward over all of them at once (max |acc - ref| / max |ref| per
    tensor, the worst over all). The model's parameters are not changed; put dropout off
    (`model.eval()`) or the two passes differ by their masks. `merge` makes one batch of the
    micro-batches (default: concatenate their tensors). The default tolerance is 1e-4, or 1e-6
    for a float64 model."""
    dtype = next(model.parameters()).dtype
    if tolerance is None:
        tolerance = 1e-6 if dtype == torch.float64 else 1e-4
    expected = reference_gradients(model, micro_batches, loss_sum_fn, merge)
    actual = accumulated_gradients(model, micro_batches, loss_sum_fn)
    sizes = {len(t) for mb in micro_batches for t in _tensors(mb)[:1]}
    return VerifyResult(max_relative_error(actual, expected), tolerance, len(micro_batches),
                        max(sizes) if sizes else 0,
                        [float(mb.num_targets()) for mb in micro_batches],
                        str(dtype).removeprefix("torch."))


def _tensors(batch: Any) -> list[torch.Tensor]:
    values = batch.values() if isinstance(batch, dict) else (
        [getattr(batch, f.name) for f in dataclasses.fields(batch)]
        if dataclasses.is_dataclass(batch) else [])
    return [v for v in values if isinstance(v, torch.Tensor)]


def verify_recipe(cfg: Config, max_micro_steps: int = 4, max_micro_batch: int = 4,
                  float64: bool = False) -> VerifyResult:
    """Take the first optimizer step's micro-batches of the recipe (at most `max_micro_steps` of
    at most `max_micro_batch` sequences, small enough to fit at once) and compare."""
    if cfg.model.source != "gpt" or not task_of(cfg).verifiable:
        raise UsageError(f"bigbatch verify checks the built-in GPT on language modelling, not "
                         f"model.source = {cfg.model.source!r} / train.task = "
                         f"{cfg.train.task!r}: use model.source = \"gpt\", train.task = \"lm\"")
    cfg = checkable_micro_batch(cfg, 1, max_micro_batch)
    corpus = prepare_corpus(cfg.data)
    split = split_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size)
    loader = TokenLoader(corpus.train_tokens, corpus.eot_id, split, rank=0, seed=cfg.train.seed)
    micro_batches = [mb.first_rows(max_micro_batch) for mb in loader.next_step()[:max_micro_steps]]
    seed_everything(cfg.train.seed)
    dtype = torch.float64 if float64 else torch.float32
    model = build_model(cfg, corpus.vocab_size).to(dtype)
    # fp32: the two orders of summation differ by a few ulps per reduction; 1e-6 in float64.
    result = verify(model, micro_batches)
    return dataclasses.replace(result, target_counts=[int(c) for c in result.target_counts])
