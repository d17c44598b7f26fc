"""`bigbatch plan --world-size N --from RUN_DIR`: whether N ranks pay against the run's critical
batch. Oracle: the batch arithmetic by hand on a run directory with a known cbs.json (or, without
one, a known last online noise scale)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigbatch.config.files import config_to_toml, load_config
from bigbatch.errors import UsageError
from bigbatch.planning.ranks import rank_advice
from small_runs import RECIPE

CRITICAL = 20_000  # tokens; the tiny recipe: 16 sequences x 128 tokens x 4 micro-steps = 8,192


def run_dir(tmp_path: Path, *, cbs: bool = True, world_size: int = 1) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(config_to_toml(load_config(RECIPE)))
    rows = [{"step": 1, "loss": 7.0, "gns_tokens": 900.0}, {"step": 2, "val_loss": 6.0},
            {"step": 3, "loss": 6.5, "gns_tokens": 1_500.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "run_info.json").write_text(json.dumps({"world_size": world_size}))
    if cbs:
        (run / "cbs.json").write_text(json.dumps({
            "final": {"step": 150, "critical_batch_tokens": CRITICAL},
            "points": [{"first_beyond_tokens": 32_768}]}))
    return run


def test_ranks_pay_while_the_global_batch_stays_within_the_critical_batch(tmp_path):
    advice = rank_advice(run_dir(tmp_path), world_size=2)
    assert (advice.micro_batch_tokens, advice.num_micro_steps) == (16 * 128, 4)
    assert advice.global_tokens == 2 * 8_192 <= CRITICAL and advice.pays
    assert "2 rank(s) pay" in advice.lines()[1] and "bigbatch cbs at step 150" in advice.lines()[0]


def test_too_many_ranks_are_told_the_accumulation_that_keeps_the_batch_within(tmp_path):
    advice = rank_advice(run_dir(tmp_path), world_size=4)
    assert advice.global_tokens == 32_768 and not advice.pays
    assert advice.max_ranks == CRITICAL // 8_192 == 2
    assert advice.max_micro_steps == CRITICAL // (4 * 2_048) == 2
    assert "up to 2 rank(s) at that share" in advice.lines()[1]
    assert "--batch.global_tokens=16384" in advice.lines()[1]
    assert json.loads(json.dumps(advice.to_dict()))["pays"] is False


def test_ranks_whose_single_micro_step_is_past_it_waste_tokens_at_any_accumulation(tmp_path):
    advice = rank_advice(run_dir(tmp_path), world_size=16)
    assert 16 * 2_048 > CRITICAL and advice.max_micro_steps == 0
    assert "at any accumulation" in advice.lines()[1]


def test_without_cbs_the_last_online_noise_scale_is_used_and_named(tmp_path):
    advice = rank_advice(run_dir(tmp_path, cbs=False), world_size=1)
    assert advice.critical_batch_tokens == 1_500.0 and not advice.pays
    assert "online noise scale B_simple at step 3" in advice.source
    assert advice.max_ranks == 0 and "the run's own batch per rank is past it" in advice.lines()[1]


def test_the_share_of_a_rank_counts_the_ranks_the_run_had(tmp_path):
    advice = rank_advice(run_dir(tmp_path, world_size=2), world_size=2)
    assert advice.num_micro_steps == 2 and advice.global_tokens == 8_192


def test_plan_json_carries_the_advice(tmp_path, monkeypatch):
    import bigbatch.planning.planner as planner
    from bigbatch.planning.ranks import plan_output

    class Plan:  # the memory search itself is test_planner's; here only what --from adds
        def to_dict(self):
            return {"micro_batch_size": 16}

    monkeypatch.setattr(planner, "plan", lambda cfg, world_size: Plan())
    monkeypatch.setattr(planner, "describe_plan", lambda plan: ["(memory plan)"])
    doc = json.loads(plan_output(None, [], 4, run_dir(tmp_path), as_json=True))
    assert doc["micro_batch_size"] == 16 and doc["ranks"]["global_tokens"] == 32_768
    assert doc["ranks"]["critical_batch_tokens"] == CRITICAL and doc["ranks"]["pays"] is False
    text = plan_output(None, [], 4, tmp_path / "run", as_json=False).splitlines()
    assert text[0] == "(memory plan)" and text[1].startswith("ranks: 4 x")


def test_a_directory_that_is_no_run_is_refused(tmp_path):
    with pytest.raises(UsageError, match="not a finished run directory"):
        rank_advice(tmp_path, world_size=2)
