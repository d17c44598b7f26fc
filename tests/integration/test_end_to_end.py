"""End to end: `bigbatch train configs/tiny.toml` on tinyshakespeare, then `sample` and `verify`.

The training runs once per module (about a minute here) through `bigbatch.cli.main`, the same
entry point as the console script. Checks:
- the validation loss falls by at least 30 % from the untrained model's (the step-0 row) to the
  last evaluation, and ends below the loss of a unigram model on the same windows;
- the run directory holds the resolved config (parsing back to the same Config), one metrics row
  per optimizer step with the documented keys, evaluation rows, TensorBoard events, and the final
  model with its shape and tokenizer;
- every logged learning rate is the schedule's value for that step, and tokens count up by the
  global batch;
- `bigbatch sample` generates text from the run, `bigbatch verify` passes (fp32 and float64).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config.files import load_config
from bigbatch.data.corpus import prepare_corpus
from bigbatch.engine.precision import with_resolved_dtype
from bigbatch.optim.schedule import learning_rate
from bigbatch.tasks.lm.wiring import unigram_baseline
from conftest import ROOT

pytestmark = pytest.mark.slow

TINY = str(ROOT / "configs" / "tiny.toml")
STEP_KEYS = {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "micro_batch_size",
             "num_micro_steps"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_overrides) -> Path:
    out = tmp_path_factory.mktemp("tiny-run")
    assert main(["train", TINY, *tiny_overrides, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_validation_loss_falls_by_30_percent(metrics):
    evals = [row for row in metrics if "val_loss" in row]
    assert evals[0]["step"] == 0
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    assert last <= 0.7 * first, (first, last)


def test_validation_loss_beats_the_unigram_model(metrics, tiny_overrides):
    """A model that learned anything beyond token frequencies scores below the unigram model's
    loss on the same validation windows."""
    cfg = load_config(TINY, tiny_overrides)
    baseline = unigram_baseline(prepare_corpus(cfg.data), cfg)
    last = [row for row in metrics if "val_loss" in row][-1]["val_loss"]
    assert last < baseline - 0.2, (last, baseline)


def test_run_directory_holds_the_outputs(run_dir, tiny_overrides):
    for name in ("config.toml", "metrics.jsonl", "model.safetensors", "model.json",
                 "tokenizer.json", "run_info.json", "report.html"):
        assert (run_dir / name).is_file(), name
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    # The recipe as it ran: precision.dtype "auto" is recorded as what it chose on this CPU.
    ran = with_resolved_dtype(load_config(TINY, tiny_overrides), torch.device("cpu"))[0]
    assert ran.precision.dtype != "auto"
    assert load_config(run_dir / "config.toml") == ran


def test_metrics_rows_follow_the_plan_and_the_schedule(metrics, tiny_overrides):
    cfg = load_config(TINY, tiny_overrides)
    steps = [row for row in metrics if "loss" in row]
    assert [row["step"] for row in steps] == list(range(1, cfg.train.max_steps + 1))
    for row in steps:
        assert STEP_KEYS <= row.keys()
        assert row["tokens"] == row["step"] * cfg.batch.global_tokens
        assert (row["micro_batch_size"], row["num_micro_steps"]) == (16, 4)
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert row["grad_norm"] > 0 and row["tokens_per_s"] > 0
        assert row["lr"] == learning_rate(
            row["step"] - 1, peak_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
            total_steps=cfg.train.max_steps, decay=cfg.optim.decay,
            min_lr_ratio=cfg.optim.min_lr_ratio)
    evals = [row["step"] for row in metrics if "val_loss" in row]
    every = cfg.train.eval_every
    assert evals == [0, *range(every, cfg.train.max_steps + 1, every)]


def test_sample_prints_text(run_dir, capsys):
    assert main(["sample", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "30"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:")
    assert len(text.strip()) > len("ROMEO:")


@pytest.mark.parametrize("flags,tolerance", [([], 1e-4), (["--float64"], 1e-6)])
def test_verify_passes_on_the_recipe(run_dir, tiny_overrides, capsys, flags, tolerance):
    # run_dir first: the corpus is tokenized and cached by then.
    assert main(["verify", TINY, *tiny_overrides, *flags]) == 0
    out = capsys.readouterr().out
    assert "OK" in out
    error = float(re.search(r"max relative error ([0-9.e+-]+)", out).group(1))
    assert error <= tolerance
