"""The micro-batch search: chooses the fastest measured candidate that fits and divides the
per-rank batch, escalates to checkpointing when nothing fits, and fails in one line naming the
memory needed; a real `auto` run stays under its budget."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest

from bigbatch.config.files import load_config
from bigbatch.errors import UsageError
from bigbatch.planning.memory import Calibration, ModelDims, Setup, estimate_memory
from bigbatch.planning.probe import ProbeResult
from bigbatch.planning.search import PEAK_HEADROOM, choose_micro_batch
from conftest import ROOT

DIMS = ModelDims(vocab_size=4096, seq_len=64, n_layer=2, d_model=64, n_head=2)
TRUE = Calibration(overhead_bytes=300 * 2**20, activation_scale=1.3)  # >= the default


def fake_probe(speeds: dict[int, float], calls: list[int]):
    """A machine whose memory follows the model with known constants, and given speeds."""
    def probe(request):
        calls.append(request.micro_batch_size)
        setup = Setup(request.micro_batch_size, checkpointing=request.checkpointing,
                      loss_chunk_tokens=request.loss_chunk_tokens)
        return ProbeResult(request.micro_batch_size, estimate_memory(DIMS, setup, TRUE).total,
                           speeds.get(request.micro_batch_size, 1.0))
    return probe


def true_peak(size: int, checkpointing: str = "none", chunk: int = 0) -> int:
    return estimate_memory(DIMS, Setup(size, checkpointing=checkpointing,
                                       loss_chunk_tokens=chunk), TRUE).total


def need(size: int, checkpointing: str = "none", chunk: int = 0) -> int:
    """What a plan needs: its peak plus the headroom the search keeps."""
    return round(true_peak(size, checkpointing, chunk) * (1 + PEAK_HEADROOM))


def test_picks_the_fastest_fitting_divisor():
    budget = (need(8) + need(16)) // 2  # 8 fits, 16 does not
    calls: list[int] = []
    speeds = {1: 10.0, 2: 20.0, 4: 45.0, 8: 40.0}  # 4 is faster than 8 here
    plan = choose_micro_batch(DIMS, Setup(1), global_tokens=24 * 64, mode="none",
                              checkpoint_every=1, loss_chunk_tokens=0, budget=budget,
                              probe=fake_probe(speeds, calls))
    assert 24 % plan.micro_batch_size == 0
    assert plan.num_micro_steps * plan.micro_batch_size == 24
    assert true_peak(plan.micro_batch_size) <= budget
    measured = {c["micro_batch_size"]: c["tokens_per_s"] for c in plan.candidates
                if c["tokens_per_s"] is not None}
    assert plan.micro_batch_size == max(measured, key=measured.get)
    assert 16 not in calls and 24 not in calls  # never probed what the model says cannot fit
    assert plan.predicted_peak_bytes == true_peak(plan.micro_batch_size)  # the fit is exact


def test_turns_on_checkpointing_then_chunked_loss_only_when_needed():
    budget = need(1, "all", 16) + 1  # nothing fits without chunked loss (16 = T / 4)
    assert need(1, "all") > budget
    plan = choose_micro_batch(DIMS, Setup(1), global_tokens=8 * 64, mode="auto",
                              checkpoint_every=1, loss_chunk_tokens=0, budget=budget,
                              probe=fake_probe({}, []))
    assert (plan.activation_checkpointing, plan.loss_chunk_tokens) == ("all", 16)
    roomy = choose_micro_batch(DIMS, Setup(1), global_tokens=8 * 64, mode="auto",
                               checkpoint_every=1, loss_chunk_tokens=0, budget=2**40,
                               probe=fake_probe({}, []))
    assert (roomy.activation_checkpointing, roomy.loss_chunk_tokens) == ("none", 0)


def test_a_speed_tie_goes_to_the_larger_micro_batch():
    """Probe speeds vary by a few %: within SPEED_TIE of the fastest, the larger micro-batch
    wins; a clearly faster small one still wins."""
    tie = choose_micro_batch(DIMS, Setup(1), global_tokens=8 * 64, mode="none",
                             checkpoint_every=1, loss_chunk_tokens=0, budget=2**40,
                             probe=fake_probe({1: 10.0, 2: 100.0, 4: 99.0, 8: 98.5}, []))
    assert tie.micro_batch_size == 8
    clear = choose_micro_batch(DIMS, Setup(1), global_tokens=8 * 64, mode="none",
                               checkpoint_every=1, loss_chunk_tokens=0, budget=2**40,
                               probe=fake_probe({1: 10.0, 2: 100.0, 4: 90.0, 8: 80.0}, []))
    assert clear.micro_batch_size == 2


def test_a_peak_inside_the_headroom_does_not_fit():
    """Peaks of one configuration spread a few % between processes: a candidate whose measured
    peak fits the budget by less than PEAK_HEADROOM is not chosen."""
    budget = true_peak(8) + 2**20  # 8's peak fits, but not with 5% room to spare
    assert need(8) > budget >= need(4)
    plan = choose_micro_batch(DIMS, Setup(1), global_tokens=8 * 64, mode="none",
                              checkpoint_every=1, loss_chunk_tokens=0, budget=budget,
                              probe=fake_probe({8: 100.0, 4: 50.0}, []))
    assert plan.micro_batch_size == 4


def test_too_small_a_budget_names_the_memory_needed():
    with pytest.raises(UsageError, match=r"needs about .* \(\d+ bytes, with 5% headroom\)"):
        choose_micro_batch(DIMS, Setup(1), global_tokens=8 * 64, mode="auto",
                           checkpoint_every=1, loss_chunk_tokens=0, budget=2**20,
                           probe=fake_probe({}, []))


def test_cli_budget_too_small_exits_2_with_one_line(tiny_overrides):
    done = subprocess.run([sys.executable, "-m", "bigbatch", "plan", "configs/tiny.toml",
                           *tiny_overrides, "--batch.memory_budget=64MiB"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "batch.memory_budget" in done.stderr and "needs about" in done.stderr


@pytest.mark.slow  # a run whose planner probes in child processes
def test_auto_run_stays_under_its_budget(shakespeare, tmp_path):
    """A real run, first on its data: it tokenizes (in a child process), the planner probes,
    writes plan.json, and the run's own peak RSS fits the budget, under the default (tuned)
    allocator whose never-trimmed heap is where a run and its probes could part ways."""
    budget = 420 * 2**20
    out = tmp_path / "run"
    overrides = [f"--data.path={shakespeare}", f"--data.cache_dir={tmp_path / 'cold-cache'}"]
    # The run's own peak (VmHWM), printed as it exits: rusage would include the probes'.
    script = ("import sys; from bigbatch.cli import main; rc = main(sys.argv[1:]); "
              "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]); "
              "sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script, "train", "configs/tiny.toml",
                           *overrides, "--out", str(out), "--batch.micro_batch_size=auto",
                           f"--batch.memory_budget={budget}", "--batch.global_tokens=2048",
                           "--train.max_steps=2", "--train.eval_tokens=1024"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "allocator: tuned" in done.stdout
    peak = int(done.stdout.strip().splitlines()[-1].split()[1]) * 1024  # VmHWM is in kB
    plan = json.loads((out / "plan.json").read_text())
    assert 16 % plan["micro_batch_size"] == 0  # 2048 tokens = 16 sequences of 128
    assert plan["micro_batch_size"] * plan["num_micro_steps"] == 16
    assert plan["predicted_peak_bytes"] <= budget
    assert peak <= budget


def test_cli_plans_with_the_tokenizer_directory_vocabulary(tiny_overrides):
    """With `data.tokenizer` set, the logits are the tokenizer's width (GPT-2: 50257), not
    data.vocab_size's: a budget that fits the tiny model's 8192-wide logits but not 50257-wide
    ones must be refused, naming more memory than with the trained BPE."""
    def needed(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "bigbatch", "plan", "configs/tiny.toml",
                               *tiny_overrides, "--batch.memory_budget=64MiB", *extra],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 2, done.stderr
        return done.stderr

    gpt2 = ROOT.parent / "shared" / "models" / "gpt2-bpe"
    own, wide = needed(), needed(f"--data.tokenizer={gpt2}")
    own_bytes, wide_bytes = (int(re.search(r"\((\d+) bytes", text).group(1))
                             for text in (own, wide))
    cfg = load_config(ROOT / "configs" / "tiny.toml", tiny_overrides)
    # At least the wider token table's fp32 weights, gradients and two AdamW moments.
    extra_table = 16 * (50257 - cfg.data.vocab_size) * cfg.model.d_model
    assert wide_bytes - own_bytes >= extra_table, (own, wide)


def test_the_plan_counts_the_configured_optimizers_state_and_the_probe_builds_it(
        tiny_overrides, monkeypatch):
    """optim.name = "sgd": one fp32 state tensor per trainable parameter (momentum), not
    AdamW's two; the probes are asked for SGD, and the probe's child builds SGD."""
    import torch

    from bigbatch.optim import registry
    from bigbatch.planning.planner import plan_for_config
    from bigbatch.planning.probe import ProbeRequest, measure

    requests = []

    def probe(request):
        requests.append(request)
        return ProbeResult(request.micro_batch_size, 300 * 2**20, 1.0)

    def planned(name: str):
        cfg = load_config(ROOT / "configs" / "tiny.toml",
                          [*tiny_overrides, f"--optim.name={name}", "--batch.memory_budget=4GiB"])
        return cfg, plan_for_config(cfg, cfg.data.vocab_size, probe=probe)

    cfg, sgd = planned("sgd")
    dims = ModelDims(cfg.data.vocab_size, cfg.data.seq_len, cfg.model.n_layer,
                     cfg.model.d_model, cfg.model.n_head)
    assert sgd.components["optimizer_state"] == 1 * 4 * dims.num_parameters
    assert requests and all(dict(r.optimizer)["name"] == "sgd" for r in requests)
    assert planned("adamw")[1].components["optimizer_state"] == 2 * 4 * dims.num_parameters

    built = []

    def spy(*args):
        built.append(registry_build(*args))
        return built[-1]

    registry_build = registry.build_optimizer
    monkeypatch.setattr(registry, "build_optimizer", spy)
    request = ProbeRequest.from_json(dataclasses.replace(
        requests[0], dims=ModelDims(64, 16, 1, 16, 2), micro_batch_size=1, num_micro_steps=1,
        num_steps=2, min_timed_seconds=0.0, allocator="system").to_json())
    assert measure(request).ok
    assert [type(o) for o in built] == [torch.optim.SGD]
