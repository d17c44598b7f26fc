"""`bigbatch sweep`: the McCandlish trade-off fit, the interpolated crossing, and one small sweep.

Oracles: points generated from S(B) = S_min + E_min / B (exactly, and with noise) give back S_min,
E_min and B_crit = E_min / S_min; the crossing of a piecewise-linear validation curve is where the
line meets the target; a real two-batch sweep writes sweep.json and the plot, and its steps and
tokens agree with the runs' own metrics.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from bigbatch.errors import UsageError
from bigbatch.tools.sweep import crossing, fit_tradeoff, parse_batches
from small_runs import ROOT, cli_command, small_args

pytestmark = pytest.mark.usefixtures("single_thread")


def test_fit_recovers_the_tradeoff_exactly():
    s_min, e_min = 40.0, 120_000.0
    batches = [512, 1024, 2048, 4096, 8192, 16384]
    s_min_fit, e_min_fit = fit_tradeoff(batches, [s_min + e_min / b for b in batches])
    assert (s_min_fit, e_min_fit) == pytest.approx((s_min, e_min), rel=1e-9)
    # ...and each point satisfies (S/S_min - 1)(E/E_min - 1) = 1.
    for b in batches:
        s = s_min + e_min / b
        assert (s / s_min - 1) * (s * b / e_min - 1) == pytest.approx(1.0, rel=1e-9)


def test_fit_with_five_percent_noise_lands_near_the_critical_batch():
    rng = np.random.default_rng(0)
    s_min, e_min = 40.0, 120_000.0  # B_crit = 3,000 tokens
    batches = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
    estimates = []
    for _ in range(20):
        steps = [(s_min + e_min / b) * (1 + 0.05 * rng.standard_normal()) for b in batches]
        fit_s, fit_e = fit_tradeoff(batches, steps)
        estimates.append(fit_e / fit_s)
    assert np.median(estimates) == pytest.approx(3000, rel=0.15)


def test_crossing_is_interpolated_between_evaluations():
    rows = [{"step": 0, "tokens": 0, "val_loss": 5.0},
            {"step": 1, "tokens": 100, "loss": 4.0},
            {"step": 10, "tokens": 1000, "val_loss": 4.0},
            {"step": 20, "tokens": 2000, "val_loss": 3.0}]
    assert crossing(rows, 3.5) == pytest.approx((15.0, 1500.0))
    assert crossing(rows, 4.0) == pytest.approx((10.0, 1000.0))
    assert crossing(rows, 2.0) is None


@pytest.mark.parametrize("text", ["4096", "a,b", "0,4096", ""])
def test_bad_batch_lists_are_refused(text):
    with pytest.raises(UsageError, match="--batches"):
        parse_batches(text)


@pytest.mark.slow  # a sweep: two training runs
def test_a_two_batch_sweep_writes_its_results(tmp_path, tiny_overrides):
    out = tmp_path / "sweep"
    done = subprocess.run(cli_command(
        "sweep", *small_args(tiny_overrides, "--model.dropout=0.0", "--optim.lr_scaling=sqrt"),
        "--batches", "1024,2048", "--target-loss", "7.3", "--max-tokens", "16384",
        "--eval-every-tokens", "1024", "--out", str(out)),
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.png").stat().st_size > 1000
    assert [p["batch_tokens"] for p in result["points"]] == [1024, 2048]
    for point in result["points"]:
        assert point["reached"]
        assert point["tokens"] == pytest.approx(point["steps"] * point["batch_tokens"])
        rows = [json.loads(line) for line in
                (out / f"batch-{point['batch_tokens']}" / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "val_loss" in r]
        assert evals[-1]["val_loss"] <= 7.3 < evals[-2]["val_loss"]  # stopped at the target
        assert evals[-2]["step"] < point["steps"] <= evals[-1]["step"]
    assert "B_crit" in done.stdout and "measured noise scale" in done.stdout


def test_sweep_without_a_target_is_a_usage_error(tmp_path):
    done = subprocess.run(cli_command("sweep", "--batches", "1024,2048"), capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--target-loss" in done.stderr


def test_a_signal_stops_the_whole_sweep(tmp_path, monkeypatch):
    """A run stopped by SIGTERM (exit 143) ends the sweep with that code; no further batch
    starts (each train() would otherwise install fresh handlers and carry on)."""
    import bigbatch.run.train
    from bigbatch.tools.sweep import run_sweep

    started = []

    def stopped_train(cfg, out_dir, verbose=True, resume=None, preemption=None):
        started.append(cfg.batch.global_tokens)
        return type("Result", (), {"exit_code": 143})()

    monkeypatch.setattr(bigbatch.run.train, "train", stopped_train)
    with pytest.raises(SystemExit) as stop:
        run_sweep(str(ROOT / "configs" / "sweep.toml"), [], [512, 1024], 3.0, tmp_path,
                  say=lambda line: None)
    assert stop.value.code == 143 and started == [512]
