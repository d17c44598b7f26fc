"""Helpers for the fault-tolerance tests: a very small model on tinyshakespeare, its metrics, and
a stand-in for a SIGTERM at a chosen step (`StopAfter`).

4 micro-steps of 8 x 64 tokens per optimizer step (k > 1), dropout on so that a resume which
forgot the random state would diverge, warmup shorter than the run so the LR changes every step.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from bigbatch.config.files import load_config
from bigbatch.config.sections import Config
from bigbatch.run.preemption import Preemption

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "tiny.toml"
SMALL = ["--model.n_layer=1", "--model.d_model=32", "--model.n_head=4", "--data.seq_len=64",
         "--batch.global_tokens=2048", "--batch.micro_batch_size=8", "--train.eval_tokens=1024",
         "--train.max_steps=6", "--train.eval_every=3",
         "--optim.warmup_steps=2", "--model.dropout=0.1",
         "--train.device=cpu", "--checkpoint.every_minutes=0", "--checkpoint.every_steps=0"]
# wall-clock and memory measurements: the only values allowed to differ between equal runs
TIMINGS = {"tokens_per_s", "step_seconds", "peak_memory_bytes"}


def small_args(tiny_overrides: list[str], *extra: str) -> list[str]:
    return [str(RECIPE), *tiny_overrides, *SMALL, *extra]


def small_config(tiny_overrides: list[str], *extra: str) -> Config:
    return load_config(RECIPE, [*tiny_overrides, *SMALL, *extra])


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bigbatch", *args]


def metric_rows(run_dir: Path) -> list[dict]:
    """Every metrics.jsonl row, timings removed."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMINGS} for row in rows]


class StopAfter(Preemption):
    """Stands in for a SIGTERM arriving during optimizer step `step`: fit() asks once per step
    whether to stop, after that step's checkpoint hook."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.asked = step, 0

    @property
    def requested(self) -> bool:
        self.asked += 1
        if self.asked >= self.step:
            self.signal = signal.SIGTERM
        return self.signal is not None


def runs_on_ranks(argv: list[str], tmp_path: Path, counts=(1, 2)) -> dict:
    """`bigbatch train ARGV --nproc N` for each N (one thread a process): N -> (step losses,
    validation losses, final weights)."""
    import os
    import subprocess

    from safetensors.torch import load_file

    runs = {}
    for nproc in counts:
        out = tmp_path / f"nproc{nproc}"
        done = subprocess.run([sys.executable, "-m", "bigbatch", "train", *argv, "--nproc",
                               str(nproc), "--out", str(out)], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
        runs[nproc] = ([r["loss"] for r in rows if "loss" in r],
                       [r["val_loss"] for r in rows if "val_loss" in r],
                       load_file(str(out / "model.safetensors")))
    return runs


def assert_ranks_agree(runs: dict, steps: int) -> None:
    """Every rank count's run equals the first's to fp32 rounding (the ranks sum gradients in
    another order): each step's loss and each evaluation to 1e-5, the weights to 1e-4."""
    import numpy as np
    import torch

    (loss1, val1, weights1), *others = runs.values()
    assert len(loss1) == steps
    for loss, val, weights in others:
        assert len(loss) == steps and len(val) == len(val1)
        np.testing.assert_allclose(loss, loss1, rtol=1e-5)
        np.testing.assert_allclose(val, val1, rtol=1e-5)
        assert weights.keys() == weights1.keys()
        for name, tensor in weights1.items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
