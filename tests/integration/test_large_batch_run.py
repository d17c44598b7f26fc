"""Training runs with a ramped batch, a sequence-length warmup, LAMB/SGD and the noise scale.

Invariants: a run stopped mid-ramp and resumed is bit for bit the run that was never stopped
(the sampler's variable position, the token-counted schedule, and the noise-scale averages and
the hold count that drive `batch.ramp = "auto"` all survive the checkpoint), the metrics rows
say each step's batch, sequence length and micro-batch shape consistently, and `auto` grows by
whole factors with the lr rescaled by its rule at each change.
"""

from __future__ import annotations

import pytest

from bigbatch.run.train import train
from small_runs import StopAfter, metric_rows, small_config

CASES = {
    "linear ramp, seq-len warmup, lamb": [
        "--batch.ramp_tokens=6000", "--batch.ramp_start_tokens=1024",
        "--data.seq_len_warmup_tokens=8000", "--data.seq_len_start=16",
        "--optim.name=lamb", "--optim.lr_scaling=linear"],
    "auto ramp, sgd": ["--batch.ramp=auto", "--batch.micro_batch_size=1",
                       "--batch.ramp_start_tokens=128",
                       "--optim.name=sgd", "--optim.lr=0.3", "--optim.lr_scaling=sqrt",
                       "--batch.noise_scale_ema=0.5"],
}


@pytest.mark.parametrize("case", CASES)
def test_ramped_run_resumes_exactly_and_logs_its_shape(tmp_path, tiny_overrides, case):
    settings = ["--precision.dtype=fp32", *CASES[case]]
    straight = train(small_config(tiny_overrides, *settings), tmp_path / "straight",
                     verbose=False)
    cfg = small_config(tiny_overrides, *settings, "--checkpoint.every_steps=2")
    run_dir = tmp_path / "resumed"
    # auto: stop inside the hold before the first change (step 3), so the resumed run grows
    # at the same step only if the controller's state (steps at the batch) was restored
    stop = 2 if case.startswith("auto") else 3
    first = train(cfg, run_dir, verbose=False, preemption=StopAfter(stop))
    assert first.state.step == stop
    second = train(cfg, run_dir, verbose=False, resume="auto")
    assert second.state.tokens_seen == straight.state.tokens_seen
    assert metric_rows(run_dir) == metric_rows(straight.out_dir)
    assert ((run_dir / "model.safetensors").read_bytes()
            == (straight.out_dir / "model.safetensors").read_bytes())

    rows = [r for r in metric_rows(straight.out_dir) if "loss" in r]
    auto = case.startswith("auto")
    unit = (1 if auto else 8) * 64  # micro_batch_size x seq_len: one micro-step on one rank
    for row in rows:
        assert row["global_tokens"] == row["num_micro_steps"] * unit
        assert row["micro_batch_size"] * row["seq_len"] == unit
        assert "gns_grad_sq" in row and "gns_trace" in row  # 2+ micro-steps from the start
    assert rows[0]["global_tokens"] == (128 if auto else 1024)
    assert rows[-1]["tokens"] >= 6 * 2048 > rows[-2]["tokens"]  # max_steps full batches
    batches = [row["global_tokens"] for row in rows]
    assert batches == sorted(batches)
    assert len(rows) > 6 and batches[-1] > batches[0]
    if not auto:
        assert batches[-1] == 2048 and rows[0]["seq_len"] == 16 and rows[-1]["seq_len"] == 64


def test_auto_ramp_grows_by_whole_factors_and_rescales_the_lr_at_each_change(tmp_path,
                                                                              tiny_overrides):
    """Through fit(): under `auto` every change of the batch multiplies it by a whole factor
    <= batch.ramp_max_growth, after at least 1 / (1 - noise_scale_ema) steps at the old batch,
    never past batch.global_tokens; and with a constant schedule (no warmup, no decay) every
    step's lr is the peak times sqrt(batch / reference), so at each change the lr moves by
    exactly sqrt of the batch's factor (optim.lr_scaling = "sqrt")."""
    cfg = small_config(tiny_overrides, *CASES["auto ramp, sgd"], "--optim.decay=constant",
                       "--optim.warmup_steps=0", "--precision.dtype=fp32",
                       # micro-steps of 32 tokens from 64: this model's noise scale (~100-300
                       # tokens) then asks for several doublings within the run
                       "--data.seq_len=32", "--batch.ramp_start_tokens=64")
    rows = [r for r in metric_rows(train(cfg, tmp_path / "run", verbose=False).out_dir)
            if "loss" in r]
    batches = [r["global_tokens"] for r in rows]
    assert len(set(batches)) >= 3, batches  # two changes at least: the run ramped
    assert max(batches) <= cfg.batch.global_tokens
    held = 0
    for before, after in zip(rows, rows[1:], strict=False):
        held += 1
        if after["global_tokens"] == before["global_tokens"]:
            continue
        factor, rest = divmod(after["global_tokens"], before["global_tokens"])
        assert rest == 0 and 2 <= factor <= cfg.batch.ramp_max_growth
        assert held >= round(1 / (1 - cfg.batch.noise_scale_ema))
        assert after["lr"] / before["lr"] == pytest.approx(factor ** 0.5, rel=1e-12)
        held = 0
    for row in rows:
        assert row["lr"] == pytest.approx(
            cfg.optim.lr * (row["global_tokens"] / cfg.batch.global_tokens) ** 0.5, rel=1e-12)
