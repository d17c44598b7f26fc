"""The online gradient noise scale (engine/noise_scale.py, measured inside train_step).

Oracle: a synthetic problem whose per-example gradients have a known mean G and covariance Sigma.
Per-example loss 0.5 |w - x|^2 with x ~ N(mu, Sigma) has gradient w - x: mean G = w - mu, covariance
Sigma, so B_simple = tr(Sigma) / |G|^2 exactly. With lr = 0 the parameters stay at w, and the
estimate that train_step feeds the moving averages must land within 10 % of that value. The
micro-batches hold different numbers of examples, and the loss is normalised by the step's global
count as for token losses, so a wrong rescaling of the small batch's gradient shows up here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bigbatch.config.sections import PrecisionConfig
from bigbatch.engine.noise_scale import (
    NoiseScaleEMA,
    noise_scale_summary,
    unbiased_grad_sq_and_trace,
)
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import train_step

pytestmark = pytest.mark.usefixtures("single_thread")

DIM = 32


@dataclass
class Examples:
    x: torch.Tensor  # (n, DIM) per-example targets of the quadratic loss

    def num_targets(self) -> torch.Tensor:
        return torch.tensor(len(self.x))


class Point(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(DIM, dtype=torch.float64))


def quadratic_loss_sum(model: Point, batch: Examples) -> torch.Tensor:
    return 0.5 * ((model.w - batch.x) ** 2).sum()


def problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """mu (so G = -mu at w = 0), the per-dimension std of x, and the analytic B_simple."""
    generator = torch.Generator().manual_seed(seed)
    mu = torch.randn(DIM, generator=generator, dtype=torch.float64)
    mu = mu / mu.norm()  # |G|^2 = 1
    std = 0.5 + 2.0 * torch.rand(DIM, generator=generator, dtype=torch.float64)
    return mu, std, float((std ** 2).sum() / (mu ** 2).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_online_estimate_is_within_ten_percent_of_the_analytic_noise_scale(seed):
    mu, std, analytic = problem(seed)
    generator = torch.Generator().manual_seed(100 + seed)
    sizes = [6, 10, 8, 12, 9, 11, 7, 9]  # uneven micro-batches: 72 examples per step
    model = Point()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    ema = NoiseScaleEMA(decay=0.999)  # ~ a plain mean over the 600 steps
    for _ in range(600):
        micro_batches = [Examples(mu + std * torch.randn(n, DIM, generator=generator,
                                                         dtype=torch.float64))
                         for n in sizes]
        stats = train_step(model, optimizer, micro_batches, precision=precision,
                           loss_sum_fn=quadratic_loss_sum)
        ema.update(*stats.noise.tolist())
    assert ema.grad_sq == pytest.approx(1.0, rel=0.1)
    assert ema.trace == pytest.approx(float((std ** 2).sum()), rel=0.1)
    assert ema.noise_scale == pytest.approx(analytic, rel=0.1)


def test_estimates_are_exact_for_noise_free_norms():
    """With |g_b|^2 equal to its expectation |G|^2 + tr(Sigma)/b, both estimates are exact."""
    grad_sq, trace = 2.0, 50.0
    small, big = torch.tensor(5.0), torch.tensor(40.0)
    est = unbiased_grad_sq_and_trace(grad_sq + trace / small, small, grad_sq + trace / big, big)
    assert est.tolist() == pytest.approx([grad_sq, trace], rel=1e-12)


def test_one_micro_step_gives_no_estimate():
    model = Point()
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0),
                       [Examples(torch.randn(8, DIM, dtype=torch.float64))],
                       precision=precision, loss_sum_fn=quadratic_loss_sum)
    assert stats.noise is None


def test_moving_average_survives_a_state_dict_round_trip_and_is_bias_corrected():
    ema = NoiseScaleEMA(decay=0.9)
    assert ema.noise_scale is None
    ema.update(2.0, 10.0)
    assert (ema.grad_sq, ema.trace, ema.noise_scale) == pytest.approx((2.0, 10.0, 5.0))
    ema.update(4.0, 10.0)
    restored = NoiseScaleEMA(decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored == ema
    assert ema.noise_scale == pytest.approx(10.0 / (0.9 * 0.1 * 2 + 0.1 * 4) * (0.9 * 0.1 + 0.1))


def test_summary_says_what_the_ratio_means():
    assert "buying little" in noise_scale_summary(60_000, 10_000.0)
    assert "larger batch" in noise_scale_summary(1_000, 10_000.0)
    assert "not measured" in noise_scale_summary(1_000, None)


def test_summary_says_what_the_ramp_did_about_the_noise_scale():
    grew = noise_scale_summary(32_768, 20_000.0, ramp="auto", first_batch_tokens=8_192,
                               full_batch_tokens=65_536)
    assert "grew the batch from 8,192 to 32,768 tokens following it" in grew
    assert "a smaller batch would do as well" not in grew  # it already followed the advice
    kept = noise_scale_summary(8_192, 2_000.0, ramp="auto", first_batch_tokens=8_192,
                               full_batch_tokens=65_536)
    assert "kept the batch at 8,192 tokens" in kept
    capped = noise_scale_summary(65_536, 500_000.0, ramp="auto", first_batch_tokens=8_192,
                                 full_batch_tokens=65_536)
    assert "stopped at batch.global_tokens" in capped
    fixed = noise_scale_summary(65_536, 2_000.0)
    assert "ramp" not in fixed and "smaller batch would do as well" in fixed
    doubled = noise_scale_summary(8_192, 2_000.0, ramp="doubling", first_batch_tokens=1_024,
                                  full_batch_tokens=8_192)
    assert "the doubling ramp grew the batch from 1,024 to 8,192 tokens" in doubled


@dataclass
class WeightedExamples:
    """Examples with weights, as classification windows (a text split in n windows weighs 1/n
    each): the batch's size is its weight sum, which can be below one."""

    x: torch.Tensor
    weights: torch.Tensor

    def num_targets(self) -> torch.Tensor:
        return self.weights.sum()


def weighted_quadratic_loss_sum(model: Point, batch: WeightedExamples) -> torch.Tensor:
    return (0.5 * ((model.w - batch.x) ** 2).sum(dim=1) * batch.weights).sum()


def test_a_small_batch_of_a_fraction_of_a_text_is_measured_at_its_true_size():
    """A first micro-batch of weight 0.2 (one window of a five-window text): the estimate must
    use 0.2 as the small batch's size, not round it up to one. Oracle: the unbiased formula on
    the gradients computed directly (small batch: its weighted mean; big batch: the step's)."""
    generator = torch.Generator().manual_seed(5)
    small = WeightedExamples(torch.randn(1, DIM, generator=generator, dtype=torch.float64),
                             torch.tensor([0.2], dtype=torch.float64))
    rest = WeightedExamples(torch.randn(6, DIM, generator=generator, dtype=torch.float64),
                            torch.full((6,), 0.8, dtype=torch.float64))
    model = Point()
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [small, rest],
                       precision=precision, loss_sum_fn=weighted_quadratic_loss_sum)

    def mean_grad(batches):  # gradient of the weighted mean loss at w = 0: -(sum w x) / sum w
        weights = torch.cat([b.weights for b in batches])
        x = torch.cat([b.x for b in batches])
        return -(weights[:, None] * x).sum(0) / weights.sum()

    expected = unbiased_grad_sq_and_trace(mean_grad([small]).square().sum(), small.weights.sum(),
                                          mean_grad([small, rest]).square().sum(),
                                          small.weights.sum() + rest.weights.sum())
    torch.testing.assert_close(stats.noise, expected, rtol=1e-10, atol=0)


def test_an_empty_small_batch_gives_no_estimate_and_the_averages_skip_it():
    """A rank's weight-0 filler micro-batch first: no small-batch gradient to compare."""
    model = Point()
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    empty = WeightedExamples(torch.ones(1, DIM, dtype=torch.float64),
                             torch.zeros(1, dtype=torch.float64))
    full = WeightedExamples(torch.randn(4, DIM, dtype=torch.float64),
                            torch.ones(4, dtype=torch.float64))
    stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), [empty, full],
                       precision=precision, loss_sum_fn=weighted_quadratic_loss_sum)
    assert torch.isnan(stats.noise).all()
    ema = NoiseScaleEMA()
    ema.update(*stats.noise.tolist())
    assert ema.count == 0 and ema.noise_scale is None
    ema.update(1.0, 4.0)
    assert ema.noise_scale == pytest.approx(4.0)


def test_measure_noise_false_gives_no_estimate():
    model = Point()
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    batches = [Examples(torch.randn(n, DIM, dtype=torch.float64)) for n in (3, 5)]
    stats = train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batches,
                       precision=precision, loss_sum_fn=quadratic_loss_sum, measure_noise=False)
    assert stats.noise is None
