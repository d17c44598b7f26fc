"""The steps-to-target benchmark's analysis: where a curve crosses a loss, and the headline rule
(the fewest serial steps among arms within 10% of the fewest tokens)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "bench_steps_to_target.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_steps_to_target", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_batch_choice", None)


def run(evals):
    return {"evals": evals, "best": min(v for _, _, v in evals)}


def test_tokens_and_steps_to_a_loss_are_interpolated_between_evaluations(bench):
    # (tokens, steps, val_loss): 5.0 lies a quarter of the way from 5.2 to 4.4
    seeds = [run([(0, 0, 7.0), (1000, 10, 5.2), (3000, 30, 4.4)]),
             run([(0, 0, 7.0), (2000, 20, 5.0), (4000, 40, 4.9)])]
    tokens, steps = bench.to_level(seeds, 5.0)
    assert tokens == pytest.approx([1500, 2000])
    assert steps == pytest.approx([15, 20])
    assert bench.to_level(seeds, 4.5) is None  # the second seed never gets there


def test_headline_takes_the_fewest_steps_within_ten_percent_of_the_fewest_tokens(bench):
    reach = {"small": (100_000, 100), "ramp": (109_000, 40), "large": (111_000, 14),
             "never": None}
    h = bench.headline(reach)
    assert (h["arm"], h["steps"], h["thrifty"]) == ("ramp", 40, "small")
    assert sorted(h["eligible"]) == ["ramp", "small"]  # large needs 11% more: out
    # with a wider slack the large batch's 14 steps win
    assert bench.headline(reach, slack=0.2)["arm"] == "large"


def test_headline_needs_an_arm_that_reaches_the_loss(bench):
    with pytest.raises(ValueError):
        bench.headline({"a": None})


def test_arms_share_the_token_budget(bench):
    for arm in bench.arm_names(None):
        args = dict(a.lstrip("-").split("=") for a in bench.arm_args(arm, 327_680))
        assert int(args["batch.global_tokens"]) * int(args["train.max_steps"]) == 327_680
    assert len(bench.arm_names(None)) == 12
    assert len(bench.arm_names(["1e-3", "3e-3"])) == 24
