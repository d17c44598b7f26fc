"""`bigbatch verify`: accumulation checked on the user's own model and data.

The gradients that `train_step` hands to the optimizer after k micro-steps are compared with one
forward/backward over the same samples at once. The error of a tensor is max|acc - ref| / max|ref|
(relative to the tensor's scale, so near-zero elements do not blow it up); the check reports the
largest over all tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from bigbatch.batching import plan_batch
from bigbatch.config import Config, PrecisionConfig
from bigbatch.data.corpus import prepare_corpus
from bigbatch.data.loader import MicroBatch, TokenLoader
from bigbatch.engine.step import lm_loss_sum, train_step
from bigbatch.errors import UsageError
from bigbatch.precision import make_precision
from bigbatch.run import build_model, seed_everything


class GradientRecorder(torch.optim.Optimizer):
    """An 'optimizer' whose step() records the gradients it was handed and changes nothing."""

    def __init__(self, params) -> None:
        super().__init__(list(params), defaults={})
        self.recorded: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - the Optimizer interface
        self.recorded = [p.grad.detach().clone() for group in self.param_groups
                         for p in group["params"]]


def concatenate(micro_batches: list[MicroBatch]) -> MicroBatch:
    return MicroBatch(torch.cat([mb.inputs for mb in micro_batches]),
                      torch.cat([mb.targets for mb in micro_batches]))


def reference_gradients(model: nn.Module, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
    """One forward/backward over all samples at once, token-mean loss."""
    model.zero_grad(set_to_none=True)
    batch = concatenate(micro_batches)
    (lm_loss_sum(model, batch) / batch.num_targets()).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def accumulated_gradients(model: nn.Module, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
    """The gradients train_step passes to the optimizer (no clipping, no scaling)."""
    recorder = GradientRecorder(model.parameters())
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    train_step(model, recorder, micro_batches, precision=precision)
    return recorder.recorded


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, e in zip(actual, expected, strict=True):
        scale = e.abs().max().clamp(min=torch.finfo(e.dtype).tiny)
        worst = max(worst, float((a - e).abs().max() / scale))
    return worst


@dataclass
class VerifyResult:
    max_relative_error: float
    tolerance: float
    num_micro_steps: int
    micro_batch_size: int
    target_counts: list[int]
    dtype: str

    @property
    def passed(self) -> bool:
        return self.max_relative_error <= self.tolerance


def checkable_micro_batch(cfg: Config, world_size: int, max_micro_batch: int) -> Config:
    """`batch.micro_batch_size = "auto"` has no size until the planner runs; the check only needs
    a size that divides the per-rank batch, so take the largest one up to `max_micro_batch`."""
    if cfg.batch.micro_batch_size != "auto":
        return cfg
    per_rank = max(1, cfg.batch.global_tokens // (cfg.data.seq_len * world_size))
    size = max(d for d in range(1, max_micro_batch + 1) if per_rank % d == 0)
    return dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, micro_batch_size=size))


def verify(cfg: Config, max_micro_steps: int = 4, max_micro_batch: int = 4,
           float64: bool = False) -> VerifyResult:
    """Take the first optimizer step's micro-batches of the recipe (at most `max_micro_steps` of
    at most `max_micro_batch` sequences, small enough to fit at once) and compare."""
    if cfg.model.source != "gpt" or cfg.train.task != "lm":
        raise UsageError(f"bigbatch verify checks the built-in GPT on language modelling, not "
                         f"model.source = {cfg.model.source!r} / train.task = "
                         f"{cfg.train.task!r}: use model.source = \"gpt\", train.task = \"lm\"")
    cfg = checkable_micro_batch(cfg, 1, max_micro_batch)
    corpus = prepare_corpus(cfg.data)
    plan = plan_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size)
    loader = TokenLoader(corpus.train_tokens, corpus.eot_id, plan, rank=0, seed=cfg.train.seed)
    micro_batches = [MicroBatch(mb.inputs[:max_micro_batch], mb.targets[:max_micro_batch])
                     for mb in loader.next_step()[:max_micro_steps]]
    seed_everything(cfg.train.seed)
    dtype = torch.float64 if float64 else torch.float32
    model = build_model(cfg, corpus.vocab_size).to(dtype)
    expected = reference_gradients(model, micro_batches)
    actual = accumulated_gradients(model, micro_batches)
    # fp32: the two orders of summation differ by a few ulps per reduction; 1e-6 in float64.
    tolerance = 1e-6 if float64 else 1e-4
    return VerifyResult(max_relative_error(actual, expected), tolerance, len(micro_batches),
                        len(micro_batches[0].inputs),
                        [int(mb.num_targets()) for mb in micro_batches],
                        "float64" if float64 else "float32")
