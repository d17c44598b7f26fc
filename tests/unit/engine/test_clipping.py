"""Gradient clipping in `train_step`, against hand-computed values.

A two-parameter model whose loss is linear in its parameters has known gradients: for
loss = w . a + b * c, dL/dw = a and dL/db = c, whatever w and b are. With a = (3, -4), c = 12 the
global L2 norm is sqrt(9 + 16 + 144) = 13. So:
- norm clipping to m < 13 multiplies every gradient by m / (13 + 1e-6) (PyTorch's epsilon);
  m >= 13 leaves them untouched;
- value clipping to v sets each element to max(-v, min(v, g));
- both: value first, then the norm of the value-clipped gradients is clipped (so both bounds hold);
- the logged `grad_norm` is 13 in every case: unscaled (also when fp16 scales the loss by 2^k)
  and measured before clipping.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bigbatch.batch import MicroBatch
from bigbatch.config.sections import PrecisionConfig
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import train_step
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.tools.verify import GradientRecorder

pytestmark = pytest.mark.usefixtures("single_thread")

A = torch.tensor([3.0, -4.0])
C = 12.0
NORM = 13.0
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grads_with_norm_ divides by (norm + 1e-6)


class LinearLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, 2.0]))
        self.b = nn.Parameter(torch.tensor([-1.0]))


class OneTarget:
    """A batch that counts one target, so train_step's normaliser is exactly 1."""

    def num_targets(self) -> torch.Tensor:
        return torch.tensor(1)


def linear_loss_sum(model: LinearLoss, batch: OneTarget) -> torch.Tensor:
    return (model.w * A).sum() + (model.b * C).sum()


def clipped(clip_norm: float = 0.0, clip_value: float = 0.0, dtype: str = "fp32",
            init_scale: float = 2.0**10):
    model = LinearLoss()
    recorder = GradientRecorder(model.parameters())
    precision = make_precision(PrecisionConfig(dtype=dtype, init_scale=init_scale),
                               torch.device("cpu"))
    stats = train_step(model, recorder, [OneTarget()], precision=precision,
                       clip_norm=clip_norm, clip_value=clip_value, loss_sum_fn=linear_loss_sum)
    w_grad, b_grad = recorder.recorded
    return torch.cat([w_grad, b_grad]), stats


UNCLIPPED = torch.tensor([3.0, -4.0, 12.0])


def test_no_clipping_hands_the_exact_gradients_over():
    grads, stats = clipped()
    assert torch.equal(grads, UNCLIPPED)
    assert float(stats.grad_norm) == NORM


@pytest.mark.parametrize("max_norm", [6.5, 1.0, 0.01])
def test_norm_clipping_matches_the_formula(max_norm):
    grads, stats = clipped(clip_norm=max_norm)
    expected = UNCLIPPED * (max_norm / (NORM + CLIP_EPS))
    torch.testing.assert_close(grads, expected, rtol=1e-6, atol=0)
    assert float(grads.norm()) == pytest.approx(max_norm, rel=1e-6)
    assert float(stats.grad_norm) == NORM  # logged before clipping


@pytest.mark.parametrize("max_norm", [13.0, 13.5, 100.0])
def test_norm_clipping_above_the_norm_changes_nothing(max_norm):
    grads, _ = clipped(clip_norm=max_norm)
    # At exactly 13 the coefficient 13 / (13 + 1e-6) is below 1 by 8e-8: within fp32 rounding.
    torch.testing.assert_close(grads, UNCLIPPED, rtol=1e-7, atol=0)


def test_value_clipping_bounds_every_element_and_keeps_the_small_ones():
    grads, stats = clipped(clip_value=3.5)
    assert torch.equal(grads, torch.tensor([3.0, -3.5, 3.5]))
    assert float(stats.grad_norm) == NORM


def test_value_then_norm_clipping_satisfies_both_bounds():
    grads, stats = clipped(clip_norm=2.0, clip_value=3.5)
    value_clipped = torch.tensor([3.0, -3.5, 3.5])
    expected = value_clipped * (2.0 / (math.sqrt(9 + 12.25 + 12.25) + CLIP_EPS))
    torch.testing.assert_close(grads, expected, rtol=1e-6, atol=0)
    assert float(grads.abs().max()) <= 3.5
    assert float(grads.norm()) <= 2.0 * (1 + 1e-6)
    assert float(stats.grad_norm) == NORM


def test_norm_bound_inactive_after_value_clip_uses_the_clipped_norm():
    """The value clip lowers the norm from 13 to 5.79; a norm limit of 8 then must not act
    (clipping with the stale pre-clip norm of 13 would wrongly scale by 8 / 13)."""
    grads, _ = clipped(clip_norm=8.0, clip_value=3.5)
    assert torch.equal(grads, torch.tensor([3.0, -3.5, 3.5]))


@pytest.mark.parametrize("init_scale", [2.0**10, 2.0**16])
def test_logged_norm_is_unscaled_and_pre_clip_under_fp16(init_scale):
    grads, stats = clipped(clip_norm=6.5, dtype="fp16", init_scale=init_scale)
    assert not stats.skipped
    assert stats.loss_scale == init_scale  # no overflow, no growth after one step
    assert float(stats.grad_norm) == NORM  # not 13 * scale, not 6.5
    torch.testing.assert_close(grads, UNCLIPPED * (6.5 / (NORM + CLIP_EPS)), rtol=1e-6, atol=0)


def test_value_clipping_bounds_every_gpt_gradient_element():
    """On a real model: first find the unclipped gradients' largest element, then clip to a
    tenth of it; every recorded element must lie in [-v, v] and some must sit on the bound."""
    torch.manual_seed(0)
    model = GPT(GPTShape(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32))
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    batch = MicroBatch(tokens[:, :-1], tokens[:, 1:])
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))

    recorder = GradientRecorder(model.parameters())
    train_step(model, recorder, [batch], precision=precision)
    largest = max(float(g.abs().max()) for g in recorder.recorded)
    limit = largest / 10

    stats = train_step(model, recorder, [batch], precision=precision, clip_value=limit)
    recorded = torch.cat([g.flatten() for g in recorder.recorded])
    assert float(recorded.abs().max()) <= limit
    assert int((recorded.abs() == limit).sum()) > 0
    assert float(stats.grad_norm) > float(recorded.norm())  # the logged norm is pre-clip
