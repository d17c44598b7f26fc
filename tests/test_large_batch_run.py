"""Training runs with a ramped batch, a sequence-length warmup, LAMB/SGD and the noise scale.

Invariants: a run stopped mid-ramp and resumed is bit for bit the run that was never stopped
(the sampler's variable position, the token-counted schedule and the noise-scale averages, which
drive `batch.ramp = "auto"`, all survive the checkpoint), and the metrics rows say each step's
batch, sequence length and micro-batch shape consistently.
"""

from __future__ import annotations

import pytest

from bigbatch.run.train import train
from small_runs import metric_rows, small_config
from test_resume import StopAfter

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
    first = train(cfg, run_dir, verbose=False, preemption=StopAfter(3))
    assert first.state.step == 3
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
