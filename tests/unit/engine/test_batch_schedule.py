"""Batch-size ramp-up and sequence-length warmup (batch_schedule.py, the loader, the LR schedule).

Invariants:
- ramp: every step's global batch is a whole number of micro-steps across ranks, never shrinks,
  starts at batch.ramp_start_tokens and is the full batch from batch.ramp_tokens on; the
  micro-batch never changes, only the number of micro-steps;
- the token-counted LR schedule puts warmup's end and the last step's floor at the same tokens
  with and without a ramp, and without one equals the step-counted schedule exactly;
- sequence-length warmup: lengths are divisors of data.seq_len, grow from data.seq_len_start to
  data.seq_len, tokens per micro-batch stay constant, the targets of a step are the same tokens as
  without warmup (each once), and no target crosses a document boundary;
- the sampler hands out a variable number of windows per step and resumes exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigbatch.batch import IGNORE_INDEX, split_batch
from bigbatch.config.files import load_config
from bigbatch.data.loader import TokenLoader
from bigbatch.engine.batch_schedule import (
    auto_micro_steps,
    build_batch_schedule,
    doubling_micro_steps,
    ramp_micro_steps,
    warmup_seq_len,
)
from bigbatch.errors import UsageError
from bigbatch.optim.schedule import learning_rate, step_learning_rate
from small_runs import RECIPE

pytestmark = pytest.mark.usefixtures("single_thread")


def config(*overrides: str):
    return load_config(RECIPE, ["--data.seq_len=64", "--batch.micro_batch_size=4",
                                "--batch.global_tokens=4096", "--train.max_steps=20",
                                "--optim.warmup_steps=4", *overrides])


def walk(schedule, noise=None):
    """(tokens before the step, its shape) for every step of the run."""
    tokens, micro_steps, steps = 0, 0, []
    while tokens < schedule.total_tokens:
        shape = schedule.shape(tokens, noise, micro_steps)
        steps.append((tokens, shape))
        tokens += shape.global_tokens
        micro_steps = shape.num_micro_steps
    return steps


@pytest.mark.parametrize("world_size", [1, 2])
def test_ramp_batches_are_whole_micro_steps_growing_to_the_full_batch(world_size):
    cfg = config("--batch.ramp_tokens=30000", "--batch.ramp_start_tokens=512")
    schedule = build_batch_schedule(cfg, split_batch(4096, 64, 4, world_size))
    unit = 4 * 64 * world_size
    steps = walk(schedule)
    batches = [shape.global_tokens for _, shape in steps]
    assert batches[0] == 512
    assert all(b % unit == 0 and b == s.num_micro_steps * unit
               for b, (_, s) in zip(batches, steps, strict=True))
    assert all(a <= b for a, b in zip(batches, batches[1:], strict=False))
    assert all(s.micro_batch_size == 4 and s.seq_len == 64 for _, s in steps)
    assert all(s.global_tokens == 4096 for t, s in steps if t >= 30000)
    assert any(s.global_tokens < 4096 for t, s in steps if t >= 15000)  # still ramping halfway
    assert sum(batches) >= schedule.total_tokens == 20 * 4096
    assert sum(batches) - schedule.total_tokens < 4096  # the last step overshoots by < 1 batch
    assert schedule.num_steps() == len(steps) > 20


def test_ramp_arithmetic():
    assert [ramp_micro_steps(t, 2, 16, 1000) for t in (0, 499, 500, 999, 1000, 5000)] == \
        [2, 8, 9, 15, 16, 16]
    assert ramp_micro_steps(0, 2, 16, 0) == 16  # no ramp


def test_auto_ramp_follows_the_noise_scale_up_only_by_whole_factors_within_bounds():
    unit = 256
    assert auto_micro_steps(None, unit, 0, 2, 16) == 2             # nothing measured yet
    assert auto_micro_steps(5 * unit + 10, unit, 2, 2, 16) == 4   # 2x: 5 / 2 rounded down
    assert auto_micro_steps(5 * unit + 10, unit, 2, 2, 16, max_growth=3) == 4
    assert auto_micro_steps(7 * unit, unit, 2, 2, 16, max_growth=4) == 6  # 3x: 7 // 2
    assert auto_micro_steps(3 * unit, unit, 2, 2, 16) == 2        # 1.5x is not a whole factor
    assert auto_micro_steps(3 * unit, unit, 5, 2, 16) == 5        # never shrinks
    assert auto_micro_steps(100 * unit, unit, 4, 2, 16) == 8      # at most max_growth per change
    assert auto_micro_steps(100 * unit, unit, 8, 2, 16) == 16     # up to the full batch
    assert auto_micro_steps(100 * unit, unit, 8, 2, 12) == 8      # 1.5x to 12 does not fit
    assert auto_micro_steps(100 * unit, unit, 2, 2, 16, may_grow=False) == 2  # holding


@pytest.mark.parametrize(("max_growth", "full_tokens"), [(2, 4096), (3, 4096), (2, 3072)])
def test_auto_ramp_walk_grows_by_whole_factors_after_each_hold(max_growth, full_tokens):
    """A noise scale that rises with the tokens seen, as it does in training, driven through
    BatchSchedule.shape the way fit() drives it: the batch only multiplies by whole factors up to
    batch.ramp_max_growth, holds 1 / (1 - noise_scale_ema) steps at each batch, never passes
    batch.global_tokens and never exceeds the noise scale it followed."""
    cfg = config("--batch.ramp=auto", "--batch.ramp_start_tokens=512",
                 f"--batch.ramp_max_growth={max_growth}", "--batch.noise_scale_ema=0.8",
                 f"--batch.global_tokens={full_tokens}")
    schedule = build_batch_schedule(cfg, split_batch(full_tokens, 64, 4))
    unit = 4 * 64
    assert schedule.hold_steps == 5

    def noise(tokens: int) -> float:
        return 300.0 + tokens / 8

    tokens, batch, held, batches = 0, 0, 0, []
    while tokens < schedule.total_tokens:
        shape = schedule.shape(tokens, noise(tokens), -(-batch // unit), held)
        if shape.global_tokens != batch:
            if batch:
                assert shape.global_tokens % batch == 0
                assert 2 <= shape.global_tokens // batch <= max_growth
                assert held >= schedule.hold_steps
                assert shape.global_tokens <= noise(tokens)
            held = 0
        batch, held = shape.global_tokens, held + 1
        batches.append(batch)
        tokens += batch
    assert batches[0] == 512 and max(batches) <= full_tokens
    assert len(set(batches)) >= 3  # the walk did ramp, through more than one change
    if full_tokens == 4096:  # reachable from 512 by whole factors: the ramp gets there
        assert batches[-1] == 4096


def test_doubling_ramp_doubles_at_evenly_spaced_tokens():
    assert [doubling_micro_steps(t, 2, 16, 600) for t in (0, 199, 200, 399, 400, 599, 600)] == \
        [2, 2, 4, 4, 8, 8, 16]
    # 12 is not 2 x a power of 2: doublings to 8 (the last that fits), then 12 at ramp_tokens
    assert [doubling_micro_steps(t, 2, 12, 400) for t in (0, 200, 399, 400)] == [2, 4, 4, 12]
    assert doubling_micro_steps(0, 2, 16, 0) == 16  # no ramp


def test_token_counted_schedule_endpoints_match_with_and_without_a_ramp():
    plain = config("--optim.decay=linear")
    ramped = config("--optim.decay=linear", "--batch.ramp_tokens=30000",
                    "--batch.ramp_start_tokens=512")
    plan = split_batch(4096, 64, 4)

    def lrs(cfg):
        return [(tokens + shape.global_tokens, step_learning_rate(
            cfg.optim, batch_tokens=shape.global_tokens, tokens_end=tokens + shape.global_tokens,
            full_batch_tokens=4096, max_steps=20))
            for tokens, shape in walk(build_batch_schedule(cfg, plan))]

    plain_lrs = lrs(plain)
    # Without a ramp: exactly the step-counted schedule.
    assert [lr for _, lr in plain_lrs] == [
        learning_rate(s, peak_lr=plain.optim.lr, warmup_steps=4, total_steps=20, decay="linear",
                      min_lr_ratio=plain.optim.min_lr_ratio) for s in range(20)]
    ramped_lrs = dict(lrs(ramped))
    peak, floor = ramped.optim.lr, ramped.optim.lr * ramped.optim.min_lr_ratio
    warmup_end = 4 * 4096
    assert max(ramped_lrs.values()) <= peak
    assert all(lr < peak for end, lr in ramped_lrs.items() if end < warmup_end)
    assert ramped_lrs[max(ramped_lrs)] == pytest.approx(floor, rel=1e-12)  # last step: floor
    # Warmup is linear in tokens: a step ending at T tokens (T <= warmup_end) has peak*T/W.
    for end, lr in ramped_lrs.items():
        if end <= warmup_end:
            assert lr == pytest.approx(peak * end / warmup_end, rel=1e-12)


def test_lr_follows_the_scaling_rule_during_a_ramp():
    cfg = config("--batch.ramp_tokens=30000", "--batch.ramp_start_tokens=512",
                 "--optim.lr_scaling=linear", "--optim.decay=constant",
                 "--optim.warmup_steps=0")
    for tokens, shape in walk(build_batch_schedule(cfg, split_batch(4096, 64, 4))):
        lr = step_learning_rate(cfg.optim, batch_tokens=shape.global_tokens,
                                tokens_end=tokens + shape.global_tokens, full_batch_tokens=4096,
                                max_steps=20)
        assert lr == pytest.approx(cfg.optim.lr * shape.global_tokens / 4096, rel=1e-12)


def test_sequence_length_warmup_lengths():
    lengths = [warmup_seq_len(t, 16, 128, 1000) for t in range(0, 1200, 50)]
    assert lengths[0] == 16 and lengths[-1] == 128
    assert set(lengths) <= {16, 32, 64, 128}
    assert all(a <= b for a, b in zip(lengths, lengths[1:], strict=False))
    assert warmup_seq_len(500, 16, 128, 1000) == 64   # linear: 72 -> the divisor below
    assert warmup_seq_len(999, 16, 96, 1000) == 48    # 95 -> 48 (divisors of 96: .., 32, 48, 96)


def test_sequence_length_warmup_keeps_tokens_and_targets_and_masks_boundaries():
    """Same sampler positions with and without warmup: every step's targets are the same stream
    positions, each once; tokens per micro-batch are constant; a target whose input is the
    end-of-text token is masked, and every other target is its input's successor in the stream."""
    eot = 7
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 64 * 200 + 1)
    tokens[rng.choice(len(tokens), 300, replace=False)] = eot  # many document boundaries
    positions = np.arange(len(tokens))
    cfg = config("--data.seq_len_warmup_tokens=40000", "--data.seq_len_start=8")
    plan = split_batch(4096, 64, 4)
    schedule = build_batch_schedule(cfg, plan)
    # The stream *positions* through the loader: the same windows, read as positions.
    warm = TokenLoader(positions, -1, plan, rank=0, seed=3)
    full = TokenLoader(positions, -1, plan, rank=0, seed=3)
    masked = TokenLoader(tokens, eot, plan, rank=0, seed=3)
    seen_lengths = set()
    for _, shape in walk(schedule)[:12]:
        seen_lengths.add(shape.seq_len)
        warm_mbs, full_mbs = warm.next_step(shape), full.next_step()
        masked_mbs = masked.next_step(shape)
        assert len(warm_mbs) == shape.num_micro_steps
        for w, f, m in zip(warm_mbs, full_mbs, masked_mbs, strict=True):
            assert w.inputs.shape == (shape.micro_batch_size, shape.seq_len)
            assert w.inputs.numel() == plan.micro_batch_size * plan.seq_len
            assert torch.equal(w.targets.flatten().sort().values,
                               f.targets.flatten().sort().values)
            assert torch.equal(w.targets, w.inputs + 1)  # the next stream position, always
            assert torch.all(m.targets[m.inputs == eot] == IGNORE_INDEX)
            kept = m.targets != IGNORE_INDEX
            assert torch.equal(m.targets[kept], torch.from_numpy(tokens)[w.targets[kept]])
    assert seen_lengths == {8, 16, 32, 64}  # the whole warmup (40,000 tokens) and after


def test_sampler_resumes_exactly_with_variable_batches():
    cfg = config("--batch.ramp_tokens=60000", "--batch.ramp_start_tokens=256",
                 "--data.seq_len_warmup_tokens=50000", "--data.seq_len_start=16")
    plan = split_batch(4096, 64, 4)
    steps = walk(build_batch_schedule(cfg, plan))
    data = np.arange(64 * 120 + 1)  # 120 windows: epochs turn over during the run
    original = TokenLoader(data, -1, plan, rank=0, seed=5)
    for _, shape in steps[:9]:
        original.next_step(shape)
    resumed = TokenLoader(data, -1, plan, rank=0, seed=5)
    resumed.load_state_dict(original.state_dict())
    for _, shape in steps[9:]:
        for a, b in zip(original.next_step(shape), resumed.next_step(shape), strict=True):
            assert torch.equal(a.inputs, b.inputs)


@pytest.mark.parametrize("overrides, key", [
    (["--batch.ramp_tokens=1000", "--batch.ramp_start_tokens=300"], "batch.ramp_start_tokens"),
    (["--batch.ramp=auto", "--batch.ramp_start_tokens=256"], "batch.ramp_start_tokens"),
])
def test_bad_ramp_settings_name_the_key(overrides, key):
    with pytest.raises(UsageError, match=key):
        build_batch_schedule(config(*overrides), split_batch(4096, 64, 4))


def test_seq_len_start_must_divide_seq_len():
    with pytest.raises(UsageError, match="data.seq_len_start"):
        config("--data.seq_len_warmup_tokens=1000", "--data.seq_len_start=24")
