"""The learning-rate schedule (optim/schedule.py), a pure function of the step.

Invariants, for peak p, warmup W, T total steps and floor f = p * min_lr_ratio:
- warmup rises strictly from p / W (near zero) at step 0 to exactly p at step W - 1;
- after warmup the rate never rises, and the last step T - 1 is exactly f (cosine, linear);
- constant decay stays exactly at p after warmup;
- with no warmup, step 0 is the peak (to an ulp: it comes from the decay formula).
Exact equality is asserted where the formula can give it: anything else means a user who asks
for lr = 3e-3 never trains at 3e-3.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigbatch.optim.schedule import learning_rate

peaks = st.sampled_from([3e-3, 1e-3, 6e-4, 3e-4, 1.234e-3, 0.1, 7e-5])
ratios = st.sampled_from([0.0, 0.1, 0.05, 1 / 3, 0.5])


def schedule(total: int, warmup: int, decay: str, peak: float = 3e-3,
             ratio: float = 0.1) -> list[float]:
    return [learning_rate(s, peak_lr=peak, warmup_steps=warmup, total_steps=total, decay=decay,
                          min_lr_ratio=ratio) for s in range(total)]


@given(peak=peaks, warmup=st.integers(1, 300), decay=st.sampled_from(["cosine", "linear",
                                                                       "constant"]))
def test_warmup_starts_near_zero_and_reaches_the_peak_exactly(peak, warmup, decay):
    lrs = schedule(warmup + 5, warmup, decay, peak)
    assert lrs[0] == pytest.approx(peak / warmup, rel=1e-12)
    assert lrs[warmup - 1] == peak  # exactly, not an ulp off
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup], strict=True))


@given(peak=peaks, ratio=ratios, warmup=st.integers(0, 50), extra=st.integers(2, 300),
       decay=st.sampled_from(["cosine", "linear"]))
def test_decay_is_monotone_and_ends_exactly_at_the_floor(peak, ratio, warmup, extra, decay):
    total = warmup + extra
    lrs = schedule(total, warmup, decay, peak, ratio)
    after_warmup = lrs[max(warmup - 1, 0):]
    # Exactly the peak where a warmup ends; with no warmup, step 0 is floor + (peak - floor).
    assert after_warmup[0] == (peak if warmup else pytest.approx(peak, rel=1e-15))
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:], strict=False))
    assert lrs[-1] == peak * ratio
    assert min(lrs[max(warmup, 1):]) >= peak * ratio


@given(peak=peaks, warmup=st.integers(0, 20), extra=st.integers(1, 100))
def test_constant_decay_stays_at_the_peak(peak, warmup, extra):
    lrs = schedule(warmup + extra, warmup, "constant", peak, ratio=0.1)
    assert all(lr == peak for lr in lrs[max(warmup - 1, 0):])


def test_cosine_midpoint_and_linear_midpoint_match_their_formulas():
    # W = 1, T = 101: decay runs over steps 0..100, so step 50 is exactly half way.
    peak, ratio = 1e-3, 0.1
    floor = peak * ratio
    cosine = learning_rate(50, peak_lr=peak, warmup_steps=1, total_steps=101, decay="cosine",
                           min_lr_ratio=ratio)
    linear = learning_rate(50, peak_lr=peak, warmup_steps=1, total_steps=101, decay="linear",
                           min_lr_ratio=ratio)
    assert cosine == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert linear == pytest.approx((peak + floor) / 2)


def test_no_warmup_starts_at_the_peak():
    assert schedule(10, 0, "cosine")[0] == pytest.approx(3e-3, rel=1e-15)


def test_unknown_decay_is_an_error():
    with pytest.raises(ValueError, match="decay"):
        learning_rate(5, peak_lr=1.0, warmup_steps=1, total_steps=10, decay="step",
                      min_lr_ratio=0.1)
