"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A).

Accumulation already computes a small-batch and a large-batch gradient every step, so the
estimate is almost free. With |g_b|^2 the squared norm of a gradient averaged over b examples,

    E|g_b|^2 = |G|^2 + tr(Sigma) / b

so two batch sizes b_small < b_big give unbiased estimates of both terms:

    |G|^2     ~ (b_big |g_big|^2 - b_small |g_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1 / b_small - 1 / b_big)

Each is noisy (a single step's |G|^2 estimate can be negative), so each is averaged with an
exponential moving average and B_simple is the ratio of the averages, not the average of ratios
(the ratio of two noisy numbers is biased; the paper does the same).

Here an "example" is a target token: batch sizes are target counts, and B_simple is in tokens.
In train_step the small batch is the first micro-batch of each rank (its gradient, before the
all-reduce, is on hand after the first backward) and the big batch is the whole step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


def unbiased_grad_sq_and_trace(small_sq: torch.Tensor, small_size: torch.Tensor,
                               big_sq: torch.Tensor, big_size: torch.Tensor
                               ) -> torch.Tensor:
    """[estimate of |G|^2, estimate of tr(Sigma)] from one small and one big batch (tensors, so
    no host sync). Sizes must differ; the caller only measures when they do."""
    small_size, big_size = small_size.double(), big_size.double()
    small_sq, big_sq = small_sq.double(), big_sq.double()
    grad_sq = (big_size * big_sq - small_size * small_sq) / (big_size - small_size)
    trace = (small_sq - big_sq) / (1.0 / small_size - 1.0 / big_size)
    return torch.stack([grad_sq, trace])


@dataclass
class NoiseScaleEMA:
    """Exponential moving averages of the |G|^2 and tr(Sigma) estimates, bias-corrected as in
    Adam (so the first steps are not pulled towards zero), and their ratio B_simple."""

    decay: float = 0.95
    grad_sq_avg: float = 0.0
    trace_avg: float = 0.0
    count: int = 0

    def update(self, grad_sq: float, trace: float) -> None:
        """Fold in one step's estimates; a non-finite pair (no small batch to compare, e.g. an
        empty first micro-batch) is skipped rather than poisoning the averages."""
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            return
        self.grad_sq_avg = self.decay * self.grad_sq_avg + (1 - self.decay) * grad_sq
        self.trace_avg = self.decay * self.trace_avg + (1 - self.decay) * trace
        self.count += 1

    def _corrected(self, value: float) -> float:
        return value / (1 - self.decay ** self.count)

    @property
    def grad_sq(self) -> float | None:
        return self._corrected(self.grad_sq_avg) if self.count else None

    @property
    def trace(self) -> float | None:
        return self._corrected(self.trace_avg) if self.count else None

    @property
    def noise_scale(self) -> float | None:
        """B_simple in tokens; None before the first estimate or while either average is not
        positive (single estimates can be negative; a loss spike can drag an average below 0)."""
        if not self.count or self.grad_sq_avg <= 0 or self.trace_avg <= 0:
            return None
        return self.trace_avg / self.grad_sq_avg  # the bias corrections cancel

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "grad_sq_avg": self.grad_sq_avg,
                "trace_avg": self.trace_avg, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The decay comes from the config of the run being resumed, not the checkpoint.
        self.grad_sq_avg, self.trace_avg = state["grad_sq_avg"], state["trace_avg"]
        self.count = state["count"]


def noise_scale_summary(batch_tokens: int, noise_tokens: float | None,
                        unit: str = "tokens", ramp: str = "", first_batch_tokens: int = 0,
                        full_batch_tokens: int = 0) -> str:
    """What the measured noise scale means for the user's batch, and what the run did about it,
    in one sentence. `unit` is what the batch counts (tokens; texts for classification); `ramp`
    names the run's batch ramp ("" = a fixed batch), which grew from `first_batch_tokens` to
    `batch_tokens` (the last step's) of at most `full_batch_tokens`."""
    did = ramp_summary(ramp, first_batch_tokens, batch_tokens, full_batch_tokens, unit)
    if noise_tokens is None or noise_tokens <= 0:
        return ("gradient noise scale: not measured (it needs 2+ micro-steps per rank), or its "
                "averages are not positive yet (too few steps, or a recent loss spike)"
                + (f"; {did}" if did else ""))
    ratio = batch_tokens / noise_tokens
    batch = "the last batch was" if ramp else "the global batch is"
    head = (f"gradient noise scale B_simple ~ {noise_tokens:,.0f} {unit}; {batch} "
            f"{batch_tokens:,} {unit} ({ratio:.2g}x the noise scale)")
    if ramp == "auto":
        if batch_tokens >= full_batch_tokens and ratio < 0.5:
            return (f"{head}: {did}; it stopped at batch.global_tokens, and a larger one (up to "
                    f"~{noise_tokens:,.0f} {unit}) would cut the number of steps further")
        return f"{head}: {did}"
    if did:
        head = f"{head}; {did}"
    if ratio > 2:
        return f"{head}: fewer, larger steps are buying little; a smaller batch would do as well"
    if ratio < 0.5:
        return (f"{head}: steps are noise-dominated; a larger batch (up to ~{noise_tokens:,.0f} "
                f"{unit}) would cut the number of steps nearly in proportion")
    return f"{head}: near the critical batch, a good trade of steps against compute"


def ramp_summary(ramp: str, first_tokens: int, last_tokens: int, full_tokens: int,
                 unit: str = "tokens") -> str:
    """What the batch ramp did, in words ("" for a fixed batch)."""
    if not ramp:
        return ""
    if ramp != "auto":
        return f"the {ramp} ramp grew the batch from {first_tokens:,} to {last_tokens:,} {unit}"
    if last_tokens > first_tokens:
        return (f"the auto ramp grew the batch from {first_tokens:,} to {last_tokens:,} {unit} "
                "following it")
    return (f"the auto ramp kept the batch at {first_tokens:,} {unit} (at most "
            f"{full_tokens:,}): the noise scale never asked for twice that")
