"""`optim.decay = "wsd"`: warmup-stable-decay (optim/schedule.py `wsd`), counted in tokens.

Invariants, for peak p, warmup W, T steps, floor f = p * min_lr_ratio, C = cooldown_fraction x T:
- warmup is the same as every schedule's; then exactly p up to step T - 1 - C;
- the cooldown ends exactly at f on step T - 1, never rises, and at known points has the known
  values: 1 - sqrt(progress) or 1 - progress of the way from p down to f;
- a cooldown longer than the steps after warmup starts where warmup ends;
- counted in tokens: under a batch ramp the lr at a token position is the lr of that position
  in full batches, so the cooldown starts at the same token whatever the batch;
- bad values are one-line errors naming the key.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bigbatch.config.files import load_config
from bigbatch.config.sections import OptimConfig
from bigbatch.errors import UsageError
from bigbatch.optim.schedule import before_cooldown, learning_rate, step_learning_rate
from small_runs import RECIPE


def wsd(step: float, total: int = 100, warmup: int = 10, shape: str = "1-sqrt",
        peak: float = 1.0, ratio: float = 0.0, fraction: float = 0.2) -> float:
    return learning_rate(step, peak_lr=peak, warmup_steps=warmup, total_steps=total,
                         decay="wsd", min_lr_ratio=ratio, cooldown_fraction=fraction,
                         cooldown_shape=shape)


def test_known_values_of_both_cooldown_shapes():
    # T = 100, C = 20: the peak through step 79, the floor at step 99.
    assert [wsd(s) for s in (9, 10, 50, 79)] == [1.0] * 4
    assert wsd(84) == pytest.approx(0.5)                        # 1 - sqrt(1/4)
    assert wsd(89) == pytest.approx(0.29289321881345254)        # 1 - sqrt(1/2)
    assert wsd(94) == pytest.approx(0.1339745962155614)         # 1 - sqrt(3/4)
    assert [wsd(s, shape="linear") for s in (84, 89, 94)] == pytest.approx([0.75, 0.5, 0.25])
    assert wsd(99) == 0.0 and wsd(99, shape="linear") == 0.0
    assert wsd(89, peak=3e-3, ratio=0.1) == pytest.approx(3e-4 + 2.7e-3 * (1 - math.sqrt(0.5)))
    assert wsd(99, peak=3e-3, ratio=0.1) == 3e-3 * 0.1  # exactly the floor
    assert wsd(4) == pytest.approx(0.5)  # warmup as every schedule: (s + 1) / W


@given(extra=st.integers(2, 400), warmup=st.integers(0, 50), ratio=st.sampled_from(
    [0.0, 0.1, 1 / 3]), fraction=st.sampled_from([0.05, 0.2, 0.5, 1.0]),
    shape=st.sampled_from(["1-sqrt", "linear"]))
def test_the_peak_holds_then_falls_monotonically_to_the_floor(extra, warmup, ratio, fraction,
                                                              shape):
    total = warmup + extra  # 2+ steps after warmup, as test_schedule.py's decay test
    lrs = [wsd(s, total, warmup, shape, 3e-3, ratio, fraction) for s in range(total)]
    after = lrs[max(warmup - 1, 0):]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    assert lrs[-1] == pytest.approx(3e-3 * ratio, abs=1e-18)
    stable_until = max(total - 1 - fraction * total, warmup - 1, 0)
    assert all(lr == 3e-3 for s, lr in enumerate(lrs) if warmup - 1 <= s <= stable_until)


def test_a_cooldown_longer_than_the_run_after_warmup_starts_where_warmup_ends():
    # T = 20, W = 10, C = 0.8 x 20 = 16 > 10: the cooldown runs from step 9 to step 19.
    assert wsd(9, total=20, fraction=0.8) == 1.0
    assert wsd(14, total=20, fraction=0.8, shape="linear") == pytest.approx(0.5)


def test_the_cooldown_starts_at_the_same_token_under_a_batch_ramp():
    """step_learning_rate at tokens_end t (any batch; lr_scaling none) is the full-batch
    schedule at position t / B - 1: the peak up to 80 full batches, then the cooldown."""
    opt = OptimConfig(lr=1.0, decay="wsd", warmup_steps=10, lr_scaling="none",
                      min_lr_ratio=0.0)
    full = 4096

    def at(tokens_end: int, batch_tokens: int) -> float:
        return step_learning_rate(opt, batch_tokens=batch_tokens, tokens_end=tokens_end,
                                  full_batch_tokens=full, max_steps=100)

    assert at(80 * full, 512) == at(80 * full, full) == 1.0
    assert at(85 * full, 1024) == at(85 * full, full) == pytest.approx(0.5)
    assert at(85 * full - 512, 512) == wsd(84 - 512 / full)
    assert 0.5 < at(85 * full - 512, 512) < 1.0


@pytest.mark.parametrize("override, message", [
    ("--optim.cooldown_fraction=0", "optim.cooldown_fraction = 0.0 is invalid: a number in "
                                    "(0, 1]"),
    ("--optim.cooldown_fraction=1.5", "optim.cooldown_fraction = 1.5 is invalid"),
    ("--optim.cooldown_shape=cosine", "optim.cooldown_shape = 'cosine' is invalid: one of "
                                      "('1-sqrt', 'linear')"),
    ("--optim.decay=wsdd", "optim.decay = 'wsdd' is invalid: one of ('cosine', 'linear', "
                           "'constant', 'wsd')"),
])
def test_bad_wsd_settings_are_one_line_errors(override, message):
    with pytest.raises(UsageError) as raised:
        load_config(RECIPE, ["--optim.decay=wsd", override])
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_unknown_cooldown_shape_is_an_error_in_the_pure_function():
    with pytest.raises(ValueError, match="cooldown shape"):
        wsd(90, shape="cosine")


@given(total=st.integers(1, 200), more=st.integers(1, 200), warmup=st.integers(0, 50),
       fraction=st.sampled_from([0.05, 0.1, 0.2, 1 / 3, 0.5, 1.0]),
       full=st.sampled_from([1, 2048, 3000]))
def test_before_cooldown_is_exactly_the_steps_a_longer_run_shares(total, more, warmup, fraction,
                                                                  full):
    """Invariant (run/extend.py rests on it): a state after s whole steps is `before_cooldown`
    exactly when each of those steps had the lr of the same step in a run planned for any longer
    length (warmup or the peak: floor 0, so the cooldown is strictly below the peak), and it is
    before the longer run's cooldown too."""
    opt = OptimConfig(lr=1.0, decay="wsd", warmup_steps=warmup, min_lr_ratio=0.0,
                      cooldown_fraction=fraction)

    def lr(step: int, steps: int) -> float:
        return step_learning_rate(opt, batch_tokens=full, tokens_end=(step + 1) * full,
                                  full_batch_tokens=full, max_steps=steps)

    shared = True  # so far: the first `done` steps have the longer run's lr
    for done in range(total + 1):
        if done:
            shared = shared and lr(done - 1, total) == lr(done - 1, total + more)
        before = before_cooldown(done * full, opt, full_batch_tokens=full, max_steps=total)
        assert before == shared, done
        if before:
            assert before_cooldown(done * full, opt, full_batch_tokens=full,
                                   max_steps=total + more)
    cosine = OptimConfig(lr=1.0, decay="cosine", warmup_steps=warmup)
    assert not before_cooldown(0, cosine, full_batch_tokens=full, max_steps=total)
