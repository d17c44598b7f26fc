"""Data parallelism on 2 CPU ranks (gloo) against one process over the same samples.

Invariants:
- one optimizer step on 2 ranks with k micro-steps each leaves the parameters a single process
  leaves after the same step over all 2k micro-batches (max relative error <= 1e-6, fp32), with
  very different target counts on the two ranks; so do the reported loss, target count and norm;
- under DDP and FSDP the gradients are reduced on the last micro-step only, every element once;
- FSDP clips by the *global* norm and by value exactly as one process does;
- a `bigbatch train --nproc 2` run writes a model that one process loads, evaluates to the run's
  own final validation loss, and samples from;
- a checkpoint written by 2 FSDP ranks resumes in one process or on 2 DDP ranks, and the run
  then matches an uninterrupted one-process run (fp32 rounding, 1e-5 relative).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config.files import load_config
from bigbatch.config.sections import PrecisionConfig
from bigbatch.engine.loop import evaluate
from bigbatch.engine.noise_scale import unbiased_grad_sq_and_trace
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import lm_loss_sum, train_step
from bigbatch.errors import UsageError
from bigbatch.parallel.launch import torchrun_command, without_flag
from bigbatch.parallel.process_group import SINGLE_PROCESS
from conftest import ROOT
from dist_worker import SCENARIOS, Scenario, eval_batches, make_problem

FP32 = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))


def max_relative_error(actual: dict, expected: dict) -> float:
    """Per tensor max|a - e| / max|e|, the worst over tensors (names must match)."""
    assert actual.keys() == expected.keys()
    return max(float((actual[n] - e).abs().max() / e.abs().max()) for n, e in expected.items())


def torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    proc = torchrun("tests/dist_worker.py", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def one_process(scenario: Scenario):
    model, batches = make_problem(scenario.k)
    stats = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batches,
                       precision=FP32, clip_norm=scenario.clip_norm,
                       clip_value=scenario.clip_value)
    counts = [int(mb.num_targets()) for mb in batches]
    return model, stats, counts


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_two_ranks_match_one_process(two_rank_results, scenario):
    dist_run = two_rank_results[scenario.name]
    model, stats, counts = one_process(scenario)
    k = scenario.k
    assert sum(counts[:k]) > 2 * sum(counts[k:])  # the ranks' target counts really differ
    if scenario.clip_norm:
        assert float(stats.grad_norm) > scenario.clip_norm  # norm clipping acts
    if scenario.clip_value:  # all |g| <= v would bound the norm by v * sqrt(n)
        numel = sum(p.numel() for p in model.parameters())
        assert float(stats.grad_norm) > scenario.clip_value * math.sqrt(numel)
    expected = {n: p.detach() for n, p in model.named_parameters()}
    assert max_relative_error(dist_run["after"], expected) <= 1e-6
    assert max_relative_error(dist_run["before"], expected) > 1e-3  # the step moved them
    assert dist_run["num_targets"] == sum(counts)
    assert dist_run["loss"] == pytest.approx(float(stats.loss), rel=1e-6)
    assert dist_run["grad_norm"] == pytest.approx(float(stats.grad_norm), rel=1e-6)


def token_mean_grad_sq(model, batches) -> float:
    model.zero_grad(set_to_none=True)
    total = sum(lm_loss_sum(model, mb) for mb in batches)
    (total / sum(mb.num_targets() for mb in batches)).backward()
    return float(sum((p.grad.double() ** 2).sum() for p in model.parameters()))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_noise_scale_uses_each_ranks_first_micro_batch_against_the_global_step(
        two_rank_results, scenario):
    """Oracle, in one process: each rank's small batch is its first micro-batch (its own token
    mean), the big batch the whole global step; the estimates are averaged over the ranks. None
    with one micro-step per rank (no local small batch) and under FSDP (no local .grad)."""
    noise = two_rank_results[scenario.name]["noise"]
    if scenario.k == 1 or scenario.strategy == "fsdp":
        assert noise is None
        return
    model, batches = make_problem(scenario.k)
    big_sq, big = token_mean_grad_sq(model, batches), sum(mb.num_targets() for mb in batches)
    per_rank = []
    for rank in range(2):
        first = batches[rank * scenario.k]
        per_rank.append(unbiased_grad_sq_and_trace(
            torch.tensor(token_mean_grad_sq(model, [first])), first.num_targets(),
            torch.tensor(big_sq), big))
    expected = torch.stack(per_rank).mean(dim=0)
    torch.testing.assert_close(noise.double(), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_gradients_reduced_once_per_step(two_rank_results, scenario):
    """Reductions happen only during the k-th (last) micro-step, and cover every gradient
    element exactly once (DDP's buckets and FSDP's units partition the parameters)."""
    dist_run = two_rank_results[scenario.name]
    numel = sum(t.numel() for t in dist_run["after"].values())
    assert set(dist_run["calls"]) == {scenario.k}
    assert dist_run["calls"][scenario.k] >= 1
    assert dist_run["elements"] == {scenario.k: numel}


def test_fsdp_run_end_evaluates_and_saves_full_weights(two_rank_results):
    """Evaluation on ranks dealt 3 and 2 (+1 masked) batches equals one process over all 5;
    the gathered state dict holds the full trained weights."""
    scenario = next(s for s in SCENARIOS if s.strategy == "fsdp")
    dist_run = two_rank_results[scenario.name]
    model, _ = make_problem(scenario.k)
    model.load_state_dict(dist_run["saved"])
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), dist_run["after"][name]), name
    single = evaluate(model, eval_batches(rank=0, world_size=1), FP32, SINGLE_PROCESS,
                      torch.device("cpu"))
    assert dist_run["val_loss"] == pytest.approx(single, rel=1e-6)


def test_train_nproc_2_end_to_end(tiny_overrides, tmp_path, capsys):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "bigbatch", "train", "configs/tiny.toml", "--nproc", "2",
         "--out", str(out), "--train.max_steps=2", "--train.eval_every=0",
         "--train.eval_tokens=4096", "--precision.dtype=fp32", *tiny_overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done in") == 1  # only rank 0 prints
    assert "micro-batch 16 x 2 micro-steps x 2 rank(s)" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows if "loss" in r] == [8192, 16384]

    # One process loads the final model and finds the run's own final validation loss.
    from bigbatch.data.corpus import prepare_corpus
    from bigbatch.data.loader import eval_micro_batches
    from bigbatch.model.artifacts import load_model

    model, _ = load_model(out)
    cfg = load_config(ROOT / "configs/tiny.toml", tiny_overrides)
    corpus = prepare_corpus(cfg.data)
    batches = eval_micro_batches(corpus.val_tokens, corpus.eot_id, cfg.data.seq_len, 4096,
                                 cfg.batch.micro_batch_size, rank=0, world_size=1)
    val_loss = evaluate(model, batches, FP32, SINGLE_PROCESS, torch.device("cpu"))
    assert val_loss == pytest.approx(rows[-1]["val_loss"], rel=1e-5)

    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_verify_nproc_2_fsdp(tiny_overrides):
    proc = subprocess.run(
        [sys.executable, "-m", "bigbatch", "verify", "configs/tiny.toml", "--nproc=2",
         "--parallel.strategy=fsdp", *tiny_overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "distributed check (fsdp, 2 ranks, float32)" in proc.stdout
    assert "0 before the last micro-step" in proc.stdout
    assert "FAILED" not in proc.stdout


def test_bad_strategy_names_the_key():
    with pytest.raises(UsageError, match="parallel.strategy"):
        load_config(overrides=["--parallel.strategy=zero3"])


def test_nproc_relaunches_torchrun_without_itself():
    assert without_flag(["cfg.toml", "--nproc", "2", "--a.b=1", "--nproc=3"], "--nproc") == [
        "cfg.toml", "--a.b=1"]
    command = torchrun_command("train", ["cfg.toml", "--nproc", "4"], 4)
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                           "-m", "bigbatch", "train", "cfg.toml"]


def test_fsdp_checkpoint_resumes_in_one_process_and_under_ddp(tiny_overrides, tmp_path):
    """Invariant: 2 FSDP ranks train steps 1-2 and checkpoint at step 2; from that checkpoint
    (`--resume auto`) one process, and separately 2 DDP ranks, train steps 3-4. Every step's
    loss, gradient norm and LR, the validation losses and the final weights equal an
    uninterrupted one-process run of 4 steps over the same samples (each global batch is the
    same 32 sequences at any world size: 2 micro-steps per rank on 2 ranks, 4 in one process).
    So the rank-1 shards of weights and Adam moments are gathered into the checkpoint and loaded
    back at another world size.

    Equal within fp32 rounding, not bitwise: the ranks' gradients are reduced, and their token
    losses summed, in another order than one process's (~1e-7 relative per sum). Adam's
    g / sqrt(v) passes that relative error of g through, so after 4 steps of lr <= 3e-3 weights
    differ by <= ~1e-6 of their tensor's magnitude (measured: <= 9.4e-7; losses bitwise equal,
    norms <= 4.2e-7). The bounds, 1e-5 relative on every logged value and on each weight tensor,
    leave a 10x margin and still fail on real resume errors: a wrong loader position or LR step
    changes the step-3 loss, and lost Adam moments the step-4 loss by 1.5e-3 relative.
    One exception: attention's key bias gets a zero gradient in exact arithmetic (softmax is
    invariant to adding q.b_k to every score of a row), so its gradient is rounding noise that
    Adam normalises into steps; it stays ~1e-7 and differs by ~50% across world sizes. It is
    checked to be negligible instead."""
    from bigbatch.model.artifacts import load_model
    from bigbatch.run.train import train
    from small_runs import SMALL, metric_rows

    settings = [*tiny_overrides, *SMALL, "--model.dropout=0.0", "--train.max_steps=4",
                "--train.eval_every=2", "--precision.dtype=fp32", "--parallel.strategy=fsdp",
                "--checkpoint.every_steps=2", "--checkpoint.keep=2"]

    def train_on_2_ranks(out: Path, *extra: str) -> None:
        proc = subprocess.run(
            [sys.executable, "-m", "bigbatch", "train", "configs/tiny.toml", "--nproc", "2",
             "--out", str(out), *settings, *extra], cwd=ROOT, capture_output=True, text=True,
            timeout=150)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "2 micro-steps x 2 rank(s)" in proc.stdout

    fsdp_dir = tmp_path / "fsdp-then-1-process"
    train_on_2_ranks(fsdp_dir)
    # The 2-rank run dies after its step-2 checkpoint: what it did later is gone.
    checkpoints = fsdp_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    shutil.rmtree(checkpoints / "step-00000004")
    (fsdp_dir / "model.safetensors").unlink()
    ddp_dir = tmp_path / "fsdp-then-ddp"
    shutil.copytree(fsdp_dir, ddp_dir)

    cfg = load_config(ROOT / "configs/tiny.toml", settings)
    assert train(cfg, fsdp_dir, verbose=False, resume="auto").state.step == 4
    train_on_2_ranks(ddp_dir, "--resume", "auto", "--parallel.strategy=ddp")
    straight = train(cfg, tmp_path / "straight", verbose=False)

    def comparable(run_dir: Path) -> list[dict]:
        # Micro-steps per rank differ, not samples. The noise scale's small batch is each rank's
        # first micro-batch (so it depends on the world size) and FSDP does not measure it.
        return [{k: v for k, v in row.items()
                 if k != "num_micro_steps" and not k.startswith("gns_")}
                for row in metric_rows(run_dir)]

    want_rows = comparable(straight.out_dir)
    assert [r["step"] for r in want_rows] == [0, 1, 2, 2, 3, 4, 4]
    losses = [r["loss"] for r in want_rows if "loss" in r]
    assert abs(losses[2] - losses[1]) > 1e-3 * losses[1]  # the resumed steps really trained
    straight_model, _ = load_model(straight.out_dir)
    key_bias = slice(cfg.model.d_model, 2 * cfg.model.d_model)  # qkv's bias is [q | k | v]
    for run_dir in (fsdp_dir, ddp_dir):
        got_rows = comparable(run_dir)
        # One row per step and value: none lost or logged twice across the resume.
        assert [(r["step"], sorted(r)) for r in got_rows] == [
            (r["step"], sorted(r)) for r in want_rows]
        for got, want in zip(got_rows, want_rows, strict=True):
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=0), (run_dir, got["step"],
                                                                           key)
        model, _ = load_model(run_dir)
        actual = {n: p.detach().clone() for n, p in model.named_parameters()}
        expected = {n: p.detach().clone() for n, p in straight_model.named_parameters()}
        for name in [n for n in expected if n.endswith("attn.qkv.bias")]:
            for bias in (actual[name], expected[name]):
                assert bias[key_bias].abs().max() < 1e-3 * bias.abs().max()  # negligible
                bias[key_bias] = 0
        assert max_relative_error(actual, expected) <= 1e-5, run_dir.name
