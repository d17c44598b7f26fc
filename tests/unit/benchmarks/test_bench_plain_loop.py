"""The benchmark's baseline loop runs: one timed step of a tiny GPT on random tokens."""

from __future__ import annotations

import importlib.util
import math

from conftest import ROOT

PLAIN_LOOP = ROOT / "benchmarks" / "plain_loop.py"


def test_plain_loop_takes_a_step_at_the_uniform_loss():
    """On uniform random tokens the freshly initialised GPT (std 0.02 weights, near-uniform
    logits) must score about ln(vocab) nats, before and after one small step."""
    spec = importlib.util.spec_from_file_location("plain_loop", PLAIN_LOOP)
    plain_loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain_loop)
    vocab = 300
    result = plain_loop.main(["--dtype=fp32", "--data=random", f"--vocab={vocab}", "--layers=1",
                              "--d-model=32", "--heads=2", "--seq-len=16", "--micro-batch=2",
                              "--global-tokens=64", "--warmup-steps=0", "--steps=1"])
    assert result["accum_steps"] == 2
    assert abs(result["last_loss"] - math.log(vocab)) < 0.3
    assert result["tokens_per_s"] > 0
