"""`bigbatch verify`: it reports a small error when accumulation is right, and fails (exit 1)
when it is wrong. The corpus is many short documents, so the micro-batches hold different
numbers of target tokens (document-boundary targets are masked): exactly where `mean / k` over
micro-batches differs from the token mean of the whole step."""

from __future__ import annotations

import re

import pytest
import torch

import bigbatch.tools.verify
from bigbatch.cli import main
from bigbatch.engine.step import lm_loss_sum
from conftest import ROOT

REPORT = re.compile(r"target tokens \[([\d, ]+)\]\) vs one batch: max relative error (\S+) "
                    r"\(tolerance (\S+)\) (OK|FAILED)")


@pytest.fixture(scope="module")
def short_documents(shakespeare, tmp_path_factory):
    """Tinyshakespeare cut into 300 files of 1 to 12 lines."""
    folder = tmp_path_factory.mktemp("short-docs")
    lines = shakespeare.read_text().splitlines()
    start = 0
    for i in range(300):
        size = 1 + (i * 7) % 12
        (folder / f"doc{i:03d}.txt").write_text("\n".join(lines[start:start + size]) + "\n")
        start += size
    return folder


def run_verify(args, capsys) -> tuple[int, list[int], float, float, str]:
    code = main(["verify", "configs/tiny.toml", *args])
    out = capsys.readouterr().out
    found = REPORT.search(out)
    assert found, out
    counts = [int(c) for c in found.group(1).split(",")]
    return code, counts, float(found.group(2)), float(found.group(3)), found.group(4)


def verify_args(short_documents, cache_dir) -> list[str]:
    return [f"--data.path={short_documents}", f"--data.cache_dir={cache_dir}",
            "--data.seq_len=64", "--batch.global_tokens=1024", "--batch.micro_batch_size=4"]


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_verify_reports_an_error_within_its_bound(short_documents, cache_dir, capsys,
                                                  monkeypatch, precision):
    """Uneven micro-batches, and the error of the accumulated gradients is at rounding level:
    a few fp32 ulps (tolerance 1e-4), and in float64 far below its own tolerance."""
    monkeypatch.chdir(ROOT)
    extra = ["--float64"] if precision == "float64" else []
    code, counts, error, tolerance, verdict = run_verify(
        [*verify_args(short_documents, cache_dir), *extra], capsys)
    assert code == 0 and verdict == "OK"
    assert len(counts) == 4 and len(set(counts)) > 1, counts  # uneven: the case that matters
    assert error <= tolerance
    assert error <= (1e-12 if precision == "float64" else 1e-5)


def mean_over_micro_batches(model, optimizer, micro_batches, *, precision, **_):
    """The common mistake: each micro-batch's own token mean, divided by k."""
    for micro_batch in micro_batches:
        loss = lm_loss_sum(model, micro_batch) / micro_batch.num_targets()
        (loss / len(micro_batches)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_verify_fails_on_a_wrong_accumulation(short_documents, cache_dir, capsys, monkeypatch):
    """With train_step replaced by mean / k over the same uneven micro-batches, verify says
    FAILED and exits 1: the check can tell right from wrong."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(bigbatch.tools.verify, "train_step", mean_over_micro_batches)
    code, counts, error, tolerance, verdict = run_verify(
        [*verify_args(short_documents, cache_dir), "--float64"], capsys)
    assert len(set(counts)) > 1, counts
    assert code == 1 and verdict == "FAILED"
    assert error > 100 * tolerance


def test_verify_accepts_auto_micro_batch(tiny_overrides, capsys, monkeypatch):
    """`batch.micro_batch_size = "auto"` is resolved for the check instead of crashing."""
    monkeypatch.chdir(ROOT)
    code = main(["verify", "configs/tiny.toml", *tiny_overrides, "--batch.micro_batch_size=auto"])
    out = capsys.readouterr().out
    assert code == 0, out
    found = REPORT.search(out)
    assert found and found.group(4) == "OK" and float(found.group(2)) <= float(found.group(3))


def test_mean_over_micro_batches_is_the_exact_loss_only_for_even_batches():
    """The premise of the wrong-accumulation test, on numbers: with target counts 3 and 1,
    mean / k weighs the lone target three times as much as the token mean does."""
    losses = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([5.0])]
    token_mean = torch.cat(losses).mean()
    mean_over_k = sum(loss.mean() for loss in losses) / len(losses)
    assert token_mean == 2.0 and mean_over_k == 3.0
