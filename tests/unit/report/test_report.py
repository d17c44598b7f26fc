"""Run reports: the page `bigbatch train` leaves behind, `bigbatch report` and `bigbatch compare`.

Invariants: the page is self-contained (no network reference, no script, every image an inlined
PNG that decodes); it holds every section and exactly one plot per metric the run logged; a
comparison draws every run's curve in every plot (each run has its own colour, so its pixels must
be there); an early-stopped run, a run without validation rows and a directory that is not a run
get a page that says so, or a one-line error and exit code 2.
"""

from __future__ import annotations

import html
import json
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bigbatch.cli import main
from bigbatch.engine.throughput import flops_per_token
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.planning.planner import describe_plan, write_plan
from bigbatch.planning.search import MemoryPlan
from bigbatch.report.data import load_run
from bigbatch.report.pages import write_compare, write_report
from bigbatch.run.preemption import Preemption
from bigbatch.run.run_info import end_run_info, read_run_info, start_run_info
from bigbatch.run.train import close_run, train
from report_runs import figures_in, make_run, rows_of, synthetic_rows
from small_runs import small_config

SECTIONS = ("summary", "plots", "config")
SUMMARY_LABELS = ("status", "model", "parameters", "data", "global batch", "plan", "precision",
                  "hardware", "duration", "final validation loss", "best validation loss",
                  "tokens seen", "mean tokens/s", "model FLOP/s, MFU")
# matplotlib's default colours C0 and C1: run 0 and run 1 of a comparison
RUN_COLOURS = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]


class StopAfterSteps(Preemption):
    """A SIGTERM that arrives during step `steps`, deterministically: `requested` is read once
    per optimizer step by the loop's should_stop."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.checks_left = steps

    @property
    def requested(self) -> bool:
        self.checks_left -= 1
        if self.checks_left <= 0 and self.signal is None:
            self.signal = signal.SIGTERM
        return self.signal is not None


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_overrides) -> Path:
    return train(small_config(tiny_overrides), tmp_path_factory.mktemp("finished"),
                 verbose=False).out_dir


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_overrides) -> Path:
    """Stopped by a SIGTERM after 3 of 6 steps, with a different global batch (so a comparison
    of the two shows different curves)."""
    result = train(small_config(tiny_overrides, "--batch.global_tokens=1024"),
                   tmp_path_factory.mktemp("stopped"), verbose=False,
                   preemption=StopAfterSteps(3))
    assert result.exit_code == 143 and result.state.step == 3
    return result.out_dir


def colour_pixels(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    distance = np.abs(image.astype(int) - np.array(rgb)).sum(axis=-1)
    return int((distance <= tolerance).sum())


def assert_self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    # no reference that a browser would fetch: every src/href is inline data or an in-page anchor
    for ref in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert ref.startswith(("data:", "#")), ref
    assert "<script" not in page and "<link" not in page and "@import" not in page


def test_train_writes_a_self_contained_report(finished_run):
    page = (finished_run / "report.html").read_text()
    assert_self_contained(page)
    images = figures_in(page)
    assert images and page.count("<img ") == len(images)
    for key, image in images.items():  # a real plot: many distinct colours, not a blank canvas
        assert image.shape[0] > 200 and image.shape[1] > 400, key
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20, key


def test_report_holds_every_section_and_one_plot_per_logged_metric(finished_run):
    page = (finished_run / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    for label in SUMMARY_LABELS:
        assert f"<th>{html.escape(label)}</th>" in page, label
    # This CPU bf16 run logs loss, validation loss, lr, grad norm, the noise scale (4 micro-steps),
    # tokens/s and peak memory; no fp16 loss scale, classification scores or batch ramp.
    assert set(figures_in(page)) == {"loss", "lr", "grad_norm", "gns", "tokens_per_s",
                                     "peak_memory_bytes"}
    assert "gradient noise scale" in page
    assert html.escape((finished_run / "config.toml").read_text()) in page
    rows = rows_of(finished_run)
    last_val = [r for r in rows if "val_loss" in r][-1]
    unigram = json.loads((finished_run / "run_info.json").read_text())["unigram_val_loss"]
    assert f"{last_val['val_loss']:.4f} nats/token at step 6 (a unigram model: {unigram:.4f})" \
        in page
    assert "finished: 6 of 6 steps" in page
    assert f"{6 * 2048:,} tokens in 6 steps" in page  # tokens seen
    assert "MFU" in page and "% of a quick" in page


@pytest.mark.parametrize("clip_logged", [True, False])
def test_every_logged_metric_gets_its_plot(tmp_path, finished_run, clip_logged):
    run_dir = make_run(tmp_path, finished_run, synthetic_rows(clip_logged))
    page = write_report(run_dir).read_text()
    assert set(figures_in(page)) == {"loss", "val_metrics", "lr", "grad_norm", "fp16", "gns",
                                     "tokens_per_s", "peak_memory_bytes", "batch_schedule"}
    computed = "not logged, so it is computed as min(norm, optim.clip_norm)" in page
    assert computed is not clip_logged
    assert "all 20 steps ran, but model.safetensors is missing" in page  # no model copied
    assert "(at the last step: the batch was ramped" in page
    assert "<td>10,000 tokens at step 20 (global batch then: 2,048 tokens)</td>" in page


@pytest.mark.slow  # stopped_run: a second training run
def test_an_early_stopped_run_says_so_in_its_report(stopped_run):
    page = (stopped_run / "report.html").read_text()  # written by train() on the SIGTERM
    assert "stopped early at step 3 of 6 (stopped by SIGTERM)" in page
    assert "--resume auto" in page
    assert set(figures_in(page)) == {"loss", "lr", "grad_norm", "gns", "tokens_per_s",
                                     "peak_memory_bytes"}
    info = json.loads((stopped_run / "run_info.json").read_text())
    assert info["sessions"][-1]["ended"] == "SIGTERM"


def test_a_run_without_validation_rows_gets_a_page(tmp_path, finished_run):
    rows = [r for r in rows_of(finished_run) if "val_loss" not in r]
    page = write_report(make_run(tmp_path, finished_run, rows)).read_text()
    assert "— (no validation rows)" in page
    assert "No validation rows were logged for: run." in page
    assert "loss" in figures_in(page)


def test_a_run_killed_before_its_first_step_gets_a_page(tmp_path, finished_run):
    run_dir = make_run(tmp_path, finished_run, [])
    page = write_report(run_dir).read_text()
    assert "no training step logged" in page and "nothing to plot" in page


def test_a_line_cut_by_a_kill_is_left_out_and_noted(tmp_path, finished_run):
    run_dir = make_run(tmp_path, finished_run, rows_of(finished_run))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "tok')
    page = write_report(run_dir).read_text()
    assert "line 10 was cut short" in page
    assert f"{6 * 2048:,} tokens in 6 steps" in page  # every whole row before it is kept


@pytest.mark.parametrize("make_dir, expected", [
    (lambda tmp: tmp, "is not a bigbatch run directory"),
    (lambda tmp: tmp / "absent", "is not a directory"),
])
def test_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path, capsys, make_dir,
                                                           expected):
    assert main(["report", str(make_dir(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and str(tmp_path) in err


def test_damaged_metrics_are_a_one_line_error(tmp_path, finished_run, capsys):
    run_dir = make_run(tmp_path, finished_run, rows_of(finished_run))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(run_dir)]) == 2
    assert "line 3 is not JSON" in capsys.readouterr().err


@pytest.mark.slow  # stopped_run: a second training run
def test_compare_draws_both_runs_in_every_plot(tmp_path, finished_run, stopped_run, capsys):
    out = tmp_path / "sweep.html"
    assert main(["compare", str(finished_run), str(stopped_run), "--out", str(out)]) == 0
    page = out.read_text()
    assert_self_contained(page)
    labels = [finished_run.name, stopped_run.name]
    for label, colour in zip(labels, ("#1f77b4", "#ff7f0e"), strict=True):
        # a row of the summary table per run, its swatch in the run's plot colour
        assert f'<span style="color:{colour}">&#9632;</span> {label}</th>' in page, label
    assert f"{6 * 2048:,} tokens in 6 steps" in page and f"{3 * 1024:,} tokens in 3 steps" in page
    images = figures_in(page)
    assert set(images) == {"loss", "val_loss_steps", "lr", "grad_norm", "gns", "tokens_per_s",
                           "peak_memory_bytes"}
    for key, image in images.items():
        for colour in RUN_COLOURS:
            assert colour_pixels(image, colour) > 30, (key, colour)
    # The check can fail: a single run's learning-rate plot has no second run's colour.
    single = figures_in((finished_run / "report.html").read_text())["lr"]
    assert colour_pixels(single, RUN_COLOURS[1]) == 0


def test_compare_rejects_bad_arguments(tmp_path, finished_run, capsys):
    assert main(["compare", str(finished_run), "--out", str(tmp_path / "a.html")]) == 2
    assert "at least two run directories" in capsys.readouterr().err
    assert main(["compare", str(finished_run), str(finished_run),
                 "--out", str(tmp_path / "a.txt")]) == 2
    assert "must name an .html file" in capsys.readouterr().err


def test_run_labels_tell_same_named_runs_apart(tmp_path, finished_run):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_run(tmp_path / "a", finished_run, rows_of(finished_run), name="run")
    b = make_run(tmp_path / "b", finished_run, rows_of(finished_run), name="run")
    page = write_compare([a, b], tmp_path / "c.html").read_text()
    assert "a/run</th>" in page and "b/run</th>" in page
    assert load_run(a).label == "run"


@pytest.mark.slow  # a training run
def test_a_failing_report_is_a_warning_not_a_failed_run(tmp_path, capsys):
    close_run(tmp_path, "finished", print, unigram_val_loss=6.0)  # an empty directory: no run to report on
    err = capsys.readouterr().err
    assert "warning: could not write the run report" in err
    assert not (tmp_path / "report.html").exists()


def test_flops_per_token_counts_every_matmul_weight_of_the_model():
    """6 FLOPs per weight of every matrix multiply (forward 2, backward 4), plus attention's
    scores and values (12 * L * d * T), per token."""
    shape = GPTShape(vocab_size=300, seq_len=32, n_layer=3, d_model=48, n_head=4)
    model = GPT(shape)
    matmul_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attention = 12 * shape.n_layer * shape.d_model * shape.seq_len
    assert flops_per_token(3, 48, 300, 32) == 6 * matmul_weights + attention


def test_mfu_is_achieved_model_flops_over_the_recorded_peak(tmp_path, finished_run):
    run_dir = make_run(tmp_path, finished_run, synthetic_rows(clip_logged=False))
    info = {"flops_per_token": 1000, "matmul_peak_flops": 1e7, "matmul_peak_dtype": "fp32",
            "world_size": 1}
    (run_dir / "run_info.json").write_text(json.dumps(info))
    # steps 2-20 (step 1 is warm-up) took 1 s each: 9 of 1,024 tokens and 10 of 2,048
    speed = (9 * 1024 + 10 * 2048) / 19
    text = write_report(run_dir).read_text()
    assert f"<td>{speed:,.0f}</td>" in text
    assert f"MFU {100 * speed * 1000 / 1e7:.1f} % of a quick fp32 matmul peak" in text


def test_run_info_keeps_sessions_only_when_resumed(tmp_path):
    cpu = torch.device("cpu")
    args = {"device": cpu, "world_size": 1, "dtype_name": "fp32", "num_parameters": 1,
            "flops": 6}
    start_run_info(tmp_path, began=time.time() - 5, resumed=False, **args)
    end_run_info(tmp_path, "SIGTERM")
    start_run_info(tmp_path, began=time.time(), resumed=True, **args)
    sessions = read_run_info(tmp_path)["sessions"]
    assert [s["ended"] for s in sessions] == ["SIGTERM", None]
    assert sessions[0]["seconds"] >= 5 and read_run_info(tmp_path)["matmul_peak_flops"] > 0
    start_run_info(tmp_path, began=time.time(), resumed=False, **args)
    assert len(read_run_info(tmp_path)["sessions"]) == 1


def test_a_planned_run_shows_its_plan(tmp_path, finished_run):
    plan = MemoryPlan(micro_batch_size=8, num_micro_steps=4, activation_checkpointing="none",
                      checkpoint_every=2, loss_chunk_tokens=0, predicted_peak_bytes=100 * 2**20,
                      budget_bytes=2**30, components={"weights": 2**20},
                      calibration={"source": "formula", "overhead_bytes": 0,
                                   "activation_scale": 1.0},
                      global_tokens=2048, seq_len=64, world_size=1, sequences_per_rank=32,
                      strategy="replicated", allreduce_bytes_per_step=0, device="cpu",
                      tactics_tried=["none"])
    run_dir = make_run(tmp_path, finished_run, rows_of(finished_run))
    write_plan(plan, run_dir)
    page = write_report(run_dir).read_text()
    assert ("micro-batch 8 x 4 micro-steps, activation checkpointing none, predicted peak "
            "100.00 MiB of a 1.00 GiB budget on cpu") in page
    assert "<summary>Memory plan (plan.json)</summary>" in page
    assert html.escape(describe_plan(plan)[0]) in page


def test_skipped_steps_without_a_loss_scale_get_their_own_plot(tmp_path, finished_run):
    rows = [{k: v for k, v in row.items() if k != "loss_scale"}
            for row in synthetic_rows(clip_logged=True)]
    page = write_report(make_run(tmp_path, finished_run, rows)).read_text()
    assert '<figure id="plot-fp16" class="plot"><h3>Skipped steps</h3>' in page
