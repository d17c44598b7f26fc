"""`optim.name = "muon"` over ranks (optim/muon.py): 2 CPU ranks (gloo) against one process.

Invariants:
- under DDP and under FSDP2, 3 muon steps on 2 ranks (each with its half of a global batch of
  very different target counts) give the losses and the weights of one process over the whole
  batch, to fp32 rounding; under FSDP the momentum buffer stays sharded like its parameter,
  unevenly where the rows do not divide by 2 (muon_dist_worker.py); one rank orthogonalising
  each matrix and scattering it gives the weights of every rank orthogonalising all, bit for bit;
- a `bigbatch train --nproc 2` run under FSDP with muon, stopped after its step-2 checkpoint
  and resumed on 2 ranks, logs every value and writes the final weights of the uninterrupted
  run bit for bit (the sharded momentum buffers go through torch.distributed.checkpoint).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from bigbatch.tools.verify import max_relative_error
from conftest import ROOT
from muon_dist_worker import STRATEGIES, fp32_newton_schulz, one_process


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("muon") / "ranks.pt"
    done = torchrun("tests/muon_dist_worker.py", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def one_rank() -> dict:
    from bigbatch.optim import muon

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(muon, "newton_schulz_dtype", fp32_newton_schulz)
        return one_process()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_equal_one_process(two_ranks, one_rank, strategy):
    """Each step's loss and the final weights match to fp32 rounding, 1e-5 relative (measured:
    losses bitwise equal, weights <= 1.8e-6). Not bitwise: the ranks' gradients are averaged in
    another order than one process sums them (~1e-7 relative), and 3 steps of Newton-Schulz
    carry that on; a wrong algorithm (a shard orthogonalised as if whole, the lr adjusted by the
    shard's shape, a lost or doubled momentum) moves weights by ~1e-2 relative."""
    ranks = two_ranks[strategy]
    assert ranks["losses"] == pytest.approx(one_rank["losses"], rel=1e-5, abs=0)
    assert one_rank["losses"][0] - one_rank["losses"][-1] > 1e-3  # the steps trained
    expected = one_rank["params"]
    assert ranks["params"].keys() == expected.keys()
    # Not qkv.bias (AdamW's): its key third has a gradient of exactly 0 in exact arithmetic
    # (softmax is shift-invariant per query), so AdamW normalises rounding noise into full steps.
    names = [n for n in expected if not n.endswith("qkv.bias")]
    assert max_relative_error([ranks["params"][n] for n in names],
                              [expected[n] for n in names]) < 1e-5


def test_under_fsdp_the_momentum_buffer_stays_sharded_unevenly(two_ranks):
    """qkv's 45 x 15 buffer: rank 0 holds rows 0-22 (torch.chunk's split), a DTensor."""
    assert two_ranks["fsdp"]["qkv_buffer"] == ("DTensor", (45, 15), (23, 15))
    assert two_ranks["ddp"]["qkv_buffer"] == ("Tensor", (45, 15), (45, 15))


def test_spreading_the_matrices_over_the_ranks_changes_no_bit(two_ranks):
    """Every rank gathers the same whole update, so the rank that orthogonalises it computes
    what each would have."""
    spread, repeated = two_ranks["fsdp"], two_ranks["fsdp-repeated"]
    assert spread["losses"] == repeated["losses"]
    for name, weight in repeated["params"].items():
        assert torch.equal(spread["params"][name], weight), name


def test_fsdp_muon_stop_and_resume_is_bit_identical(tiny_overrides, tmp_path):
    from small_runs import SMALL, metric_rows

    settings = [*tiny_overrides, *SMALL, "--model.n_layer=2", "--train.max_steps=4",
                "--train.eval_every=2", "--parallel.strategy=fsdp", "--optim.name=muon",
                "--checkpoint.every_steps=2", "--checkpoint.keep=2"]

    def train_on_2_ranks(*extra: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "bigbatch", "train", "configs/tiny.toml", "--nproc", "2",
             "--out", str(run_dir), *settings, *extra], cwd=ROOT, capture_output=True,
            text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "run"
    train_on_2_ranks()
    straight_rows = metric_rows(run_dir)
    straight_weights = (run_dir / "model.safetensors").read_bytes()
    # The run dies after its step-2 checkpoint: what it did later is gone.
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000002", "step-00000004"]
    shutil.rmtree(checkpoints / "step-00000004")
    (run_dir / "model.safetensors").unlink()
    train_on_2_ranks("--resume", "auto")
    assert metric_rows(run_dir) == straight_rows
    losses = [row["loss"] for row in straight_rows if "loss" in row]
    assert len(losses) == 4 and losses[2] != losses[1]  # the resumed steps really trained
    assert (run_dir / "model.safetensors").read_bytes() == straight_weights
