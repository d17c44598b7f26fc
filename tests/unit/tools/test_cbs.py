"""`bigbatch cbs`: the critical batch by branching from checkpoints.

Oracles:
- exact numbers: tokens-to-target following McCandlish's E(B) = E_min (1 + B / B_noise) give the
  critical batch (1 + tol) B_1 + tol B_noise in closed form (E(B) / E(B_1) is linear in B);
- a synthetic problem whose noise scale is known: noise-free linear regression y = a.x with
  x ~ N(0, I) in D dimensions has per-example gradients (d.x) x (d = w - a), of mean d and
  covariance |d|^2 I + d d^T, so B_noise = tr(Sigma) / |G|^2 = D + 1 at every w. SGD at the optimal
  learning rate for batch B, B / (B + B_noise), shrinks the expected loss by B_noise / (B + B_noise)
  per step exactly, so the expected tokens to any target, and the critical batch they imply,
  are known; branches trained with the product's train_step must find it;
- end to end: a real tiny run with 2 checkpoints; cbs.json agrees with the branches' own
  metrics, and plan --from reads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from bigbatch.config.sections import PrecisionConfig
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import train_step
from bigbatch.tools.cbs_search import TARGET_FRACTION, critical_batch, search
from bigbatch.tools.sweep import crossing

pytestmark = pytest.mark.usefixtures("single_thread")


def test_critical_batch_of_the_mccandlish_law_is_exact():
    e_min, b_noise, b1 = 50_000.0, 20_000.0, 1_000
    batches = [b1 * f for f in (1, 2, 4, 8, 16)]
    found = critical_batch(batches, [e_min * (1 + b / b_noise) for b in batches])
    assert found.crossing == pytest.approx(1.2 * b1 + 0.2 * b_noise, rel=1e-12)  # 5,200
    assert (found.largest_within, found.first_beyond) == (4_000, 8_000)
    assert found.reference_tokens == pytest.approx(e_min * (1 + b1 / b_noise))


def test_every_batch_within_tolerance_is_a_lower_bound():
    found = critical_batch([1, 2, 4], [100.0, 101.0, 110.0])
    assert (found.largest_within, found.crossing, found.first_beyond) == (4, None, None)
    assert found.estimate == 4.0


def test_a_branch_that_never_reached_the_target_brackets_without_a_crossing():
    found = critical_batch([1, 2, 4, 8], [100.0, 110.0, None, 105.0])
    assert (found.largest_within, found.crossing, found.first_beyond) == (2, None, 4)


def test_the_walk_stops_at_the_first_batch_beyond_and_measures_against_the_fewest():
    # 4 is beyond 1.2 x the fewest (2's 90 tokens); 8 looks within again, by noise: ignored.
    found = critical_batch([1, 2, 4, 8], [100.0, 90.0, 126.0, 100.0])
    assert found.reference_tokens == 90.0
    assert found.largest_within == 2 and found.first_beyond == 4
    assert found.crossing == pytest.approx(2 + (1.2 - 1.0) / (1.4 - 1.0) * 2)


@dataclass
class Examples:
    x: torch.Tensor  # (replicas, n, D): each replica its own draws

    def num_targets(self) -> torch.Tensor:
        return torch.tensor(self.x.shape[1])


class Replicas(nn.Module):
    """R independent copies of the regression's error d = w - a, trained side by side: their
    mean loss curve estimates the expected one R times more tightly than one run."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.d = nn.Parameter(start.clone())


def regression_loss_sum(model: Replicas, batch: Examples) -> torch.Tensor:
    # per example 0.5 (d.x)^2: the squared error of y = a.x; summed over replicas, so each
    # replica's gradient is its own batch mean (train_step divides by n)
    return 0.5 * torch.einsum("rd,rnd->rn", model.d, batch.x).square().sum()


DIM, REPLICAS, MICRO = 511, 24, 32
B_NOISE = DIM + 1


def regression_branch(seed: int, steps_log: list[int]):
    """A BranchFn: each call starts from the same point (the 'checkpoint') and trains SGD at
    the optimal lr for its batch with train_step, evaluating the exact loss mean 0.5 |d|^2
    after every step."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(REPLICAS, DIM, generator=generator)
    start = start / start.norm(dim=1, keepdim=True)  # every replica at loss 0.5
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))

    def exact_loss(model: Replicas) -> float:
        return float(0.5 * model.d.detach().square().sum(1).mean())

    def branch(batch: int, target: float | None, budget: int) -> tuple[list[dict], float]:
        model = Replicas(start)
        lr = batch / (batch + B_NOISE)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        rows = [{"step": 0, "tokens": 0, "val_loss": exact_loss(model)}]
        for step in range(1, -(-budget // batch) + 1):
            micro = [Examples(torch.randn(REPLICAS, MICRO, DIM, generator=generator))
                     for _ in range(batch // MICRO)]
            train_step(model, optimizer, micro, precision=precision,
                       loss_sum_fn=regression_loss_sum, measure_noise=False)
            rows.append({"step": step, "tokens": step * batch, "val_loss": exact_loss(model)})
            if target is not None and rows[-1]["val_loss"] <= target:
                break
        steps_log.append(batch)
        return rows, lr

    return branch


def expected_rows(batch: int, budget: int) -> list[dict]:
    """The expected curve: loss 0.5 x (B_noise / (B + B_noise))^t, on the same evaluation grid."""
    shrink = B_NOISE / (batch + B_NOISE)
    return [{"step": t, "tokens": t * batch, "val_loss": 0.5 * shrink ** t}
            for t in range(-(-budget // batch) + 1)]


@pytest.mark.parametrize("seed", [0, 1])
def test_branches_find_the_critical_batch_of_a_problem_with_a_known_noise_scale(seed):
    batches = [B_NOISE // 16 * f for f in (1, 2, 4, 8, 16)]  # 32 .. 512 examples
    budget = 40 * batches[0]
    # The oracle: the search's own arithmetic on the expected curves (target: the smallest
    # batch's expected loss at TARGET_FRACTION of the budget).
    target = 0.5 * (B_NOISE / (batches[0] + B_NOISE)) ** (TARGET_FRACTION * budget / batches[0])
    tokens = [crossing(expected_rows(b, budget), target)[1] for b in batches]
    oracle = critical_batch(batches, tokens)
    # ...which is where the law itself puts it: E(B) ~ B / ln(1 + B / B_noise), so
    # E(B) / E(B_1) = 1.2 at B / B_noise ~ 0.5 here, i.e. B* ~ 256 = 8x the smallest batch.
    def excess(batch: float) -> float:  # E(B) / E(B_1) - 1.2 under the law, rising in B
        return (batch / math.log1p(batch / B_NOISE)) / (
            batches[0] / math.log1p(batches[0] / B_NOISE)) - 1.2

    low, high = batches[0], batches[-1]
    for _ in range(60):  # bisection: the law's own root, apart from the search's arithmetic
        low, high = (low, (low + high) / 2) if excess((low + high) / 2) > 0 else \
            ((low + high) / 2, high)
    assert 0.45 * B_NOISE < low < 0.55 * B_NOISE  # ~ 0.5 B_noise = 8x the smallest batch
    assert oracle.crossing == pytest.approx(low, rel=0.03)

    ran: list[int] = []
    found = search(regression_branch(seed, ran), batches, budget, say=lambda line: None)
    assert found.target_loss == pytest.approx(target, rel=0.05)
    assert found.critical.crossing == pytest.approx(oracle.crossing, rel=0.1)
    # The search stops at the first batch beyond tolerance: larger ones are never trained.
    assert ran == batches[:batches.index(found.critical.first_beyond) + 1]
    for branch in found.branches:
        assert branch.lr == pytest.approx(branch.batch_tokens / (branch.batch_tokens + B_NOISE))
        expected = crossing(expected_rows(branch.batch_tokens, budget), found.target_loss)[1]
        assert branch.tokens_to_target == pytest.approx(expected, rel=0.08)


def test_cbs_on_a_real_run_branches_from_its_checkpoints(tmp_path, tiny_overrides, capsys):
    """A tiny run with checkpoints at steps 2 and 4, branched at 1x and 2x its batch. A branch
    is a resumed run: the 1x branch's first step sees the run's weights and data, so its loss is
    the run's own at that step; the 2x branch's lr is the run's at the checkpoint x sqrt(2) (the
    run has no rule: cbs says sqrt); cbs.json's tokens to the target agree with the branches'
    metrics, and its noise scale with the run's."""
    from bigbatch.cli import main
    from bigbatch.run.train import train
    from small_runs import small_config

    run = tmp_path / "run"
    train(small_config(tiny_overrides, "--train.max_steps=4", "--train.eval_every=2",
                       "--checkpoint.every_steps=2", "--checkpoint.keep=10"), run,
          verbose=False, report=False)
    assert main(["cbs", str(run), "--factors", "1,2", "--branch-tokens", "8192",
                 "--eval-every-tokens", "2048"]) == 0
    assert "critical batch" in capsys.readouterr().out
    result = json.loads((run / "cbs.json").read_text())
    assert (run / "cbs.png").stat().st_size > 1000
    run_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [p["step"] for p in result["points"]] == [2, 4] and result["lr_scaling"] == "sqrt"
    for point in result["points"]:
        step, tokens = point["step"], point["tokens"]
        logged = {r["step"]: r for r in run_rows if "loss" in r}
        assert point["start_loss"] == next(r["val_loss"] for r in run_rows
                                           if r["step"] == step and "val_loss" in r)
        assert point["noise_scale_tokens"] == logged[step]["gns_tokens"]
        assert point["lr"] == pytest.approx(logged[step]["lr"], rel=1e-12)
        for branch in point["branches"]:
            rows = [json.loads(line) for line in (run / "cbs-branches" / f"step-{step}" /
                    f"batch-{branch['batch_tokens']}" / "metrics.jsonl").read_text().splitlines()]
            first = next(r for r in rows if "loss" in r)
            assert first["step"] == step + 1 and first["global_tokens"] == branch["batch_tokens"]
            if branch["batch_tokens"] == point["batch_tokens"] and step + 1 in logged:
                assert first["loss"] == logged[step + 1]["loss"]  # the same model, the same data
            factor = branch["batch_tokens"] / point["batch_tokens"]
            assert first["lr"] == pytest.approx(point["lr"] * math.sqrt(factor), rel=1e-12)
            relative = [{"step": 0, "tokens": 0, "val_loss": point["start_loss"]}] + [
                {"step": r["step"] - step, "tokens": r["tokens"] - tokens,
                 "val_loss": r["val_loss"]} for r in rows if "val_loss" in r]
            found = crossing(relative, point["target_loss"])
            assert branch["tokens_to_target"] == pytest.approx(found[1])
    assert result["final"]["critical_batch_tokens"] == result["points"][-1]["critical_batch_tokens"]
