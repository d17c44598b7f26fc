"""Exact resume: stopping and resuming changes nothing, bit for bit, on CPU."""

from __future__ import annotations

import signal

import pytest

from bigbatch.errors import UsageError
from bigbatch.model.gpt import GPT
from bigbatch.run.checkpoint_files import list_checkpoints, verify_checkpoint
from bigbatch.run.train import train
from small_runs import StopAfter, metric_rows, small_config


@pytest.mark.slow  # three training runs
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path, tiny_overrides, dtype):
    """Invariant: 3 steps, a stop with a checkpoint, and a resume into freshly built objects give
    the same per-step losses, gradient norms, learning rates, validation losses and final weights
    as 6 steps straight, bit for bit. k = 4 micro-steps, dropout on (the RNG must be restored),
    LR warmup 2 (the schedule position must be restored). Only the interrupted run writes
    periodic checkpoints (and rotates them), so saving must not perturb training either."""
    straight = train(small_config(tiny_overrides, f"--precision.dtype={dtype}"),
                     tmp_path / "straight", verbose=False)
    cfg = small_config(tiny_overrides, f"--precision.dtype={dtype}",
                       "--checkpoint.every_steps=2", "--checkpoint.keep=1")
    run_dir = tmp_path / "resumed"

    first = train(cfg, run_dir, verbose=False, preemption=StopAfter(3))
    assert (first.state.step, first.exit_code) == (3, 128 + signal.SIGTERM)
    assert not (run_dir / "model.safetensors").exists()  # a stopped run is not a finished one
    # step-2 was written by every_steps, then rotated out (keep = 1) by the stop's step-3.
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step-00000003"]

    second = train(cfg, run_dir, verbose=False, resume="auto")
    assert (second.state.step, second.exit_code) == (6, 0)
    assert second.state.tokens_seen == straight.state.tokens_seen
    resumed_rows, straight_rows = metric_rows(run_dir), metric_rows(straight.out_dir)
    assert [row["step"] for row in straight_rows] == [0, 1, 2, 3, 3, 4, 5, 6, 6]
    assert resumed_rows == straight_rows  # also: no row logged twice
    assert ((run_dir / "model.safetensors").read_bytes()
            == (straight.out_dir / "model.safetensors").read_bytes())


def test_non_finite_steps_are_skipped_then_stop_with_the_good_checkpoint_intact(
        tmp_path, tiny_overrides, monkeypatch):
    """From step 3 on the training loss is NaN: each such step is skipped and counted (weights
    untouched), no checkpoint is written during the streak (so rotation cannot push the good
    ones out), and after train.max_bad_steps = 3 in a row the run stops with one line naming the
    last good checkpoint."""
    real_forward, training_calls = GPT.forward, []

    def nan_from_step_3(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            training_calls.append(1)
            if len(training_calls) > 2 * 4:  # 4 micro-steps per step
                out = out * float("nan")
        return out

    monkeypatch.setattr(GPT, "forward", nan_from_step_3)
    run_dir = tmp_path / "run"
    cfg = small_config(tiny_overrides, "--checkpoint.every_steps=1", "--checkpoint.keep=2",
                       "--train.max_bad_steps=3")
    with pytest.raises(UsageError) as err:
        train(cfg, run_dir, verbose=False)
    message = str(err.value)
    assert "\n" not in message and "3 optimizer steps in a row had non-finite" in message
    good = run_dir / "checkpoints" / "step-00000002"
    assert f"the last checkpoint, {good} (step 2), is intact" in message
    assert list_checkpoints(run_dir / "checkpoints") == [run_dir / "checkpoints" / "step-00000001",
                                                         good]
    assert verify_checkpoint(good) is None
    rows = [row for row in metric_rows(run_dir) if "loss" in row]
    assert [row["skipped_steps"] for row in rows] == [0, 0, 1, 2, 3]
    assert all(row["grad_norm"] != row["grad_norm"] for row in rows[2:])  # NaN


@pytest.mark.slow  # training runs
def test_a_new_run_into_a_used_out_is_refused_and_overwrite_replaces_it(tmp_path,
                                                                         tiny_overrides):
    """A finished run with no checkpoint (none was due) still holds a run: a second run into
    the same --out must not append to its metrics.jsonl. It is refused with one line naming what
    is there and the ways out; --overwrite replaces the outputs (and keeps a user's own file),
    so the directory then holds exactly one run's rows, equal to a run into a fresh one."""
    cfg = small_config(tiny_overrides, "--train.max_steps=2", "--train.eval_every=2")
    used = tmp_path / "used"
    train(cfg, used, verbose=False)
    assert not list_checkpoints(used / "checkpoints")
    (used / "notes.txt").write_text("mine")
    with pytest.raises(UsageError) as refused:
        train(cfg, used, verbose=False)
    message = str(refused.value)
    assert "already holds a run" in message and "metrics.jsonl" in message
    for way_out in ("another --out", "--resume auto", "--overwrite"):
        assert way_out in message
    train(cfg, used, verbose=False, overwrite=True)
    fresh = train(cfg, tmp_path / "fresh", verbose=False)
    assert metric_rows(used) == metric_rows(fresh.out_dir)
    assert [row["step"] for row in metric_rows(used)].count(0) == 1
    assert (used / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="contradict"):
        train(cfg, used, verbose=False, resume="auto", overwrite=True)
