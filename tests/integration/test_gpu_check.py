"""`make gpu-check` runs to its end where there is no GPU: every GPU step says it is skipped and
why, the CUDA tests are collected and skipped with their reason, and it exits 0. (On a GPU the
same script runs them; README, "On a GPU".)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU `make gpu-check` runs it all")
def test_gpu_check_runs_to_its_end_without_a_gpu():
    env = {**os.environ, "GPU_PYTHON": sys.executable}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out = done.stdout
    assert "9 skipped" in out and "needs a CUDA GPU: this torch is built without CUDA" in out
    for step in ("1/8: CUDA tests", "2/8: bigbatch train, bf16", "2/8: bigbatch train, fp16",
                 "3/8: bigbatch train, muon + wsd", "4/8: bigbatch plan", "5/8: training benchmark",
                 "6/8: optimizer step time", "7/8: document masking", "8/8: the default recipe"):
        assert step in out
    assert out.count("\nskipped: this torch is built without CUDA\n") == 5  # 3 trains, plan,
    # document masking
    assert "bench_gpu: skipped: no CUDA device" in out
    assert "bench_optim_step: skipped: no CUDA device" in out
    assert "bench_recipe_choice: skipped: no CUDA device" in out
    assert "gpu-check: done" in out
