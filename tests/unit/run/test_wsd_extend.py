"""The checkpoints a wsd run keeps for an extension (run/checkpoint.py, run/extend.py); the
whole extension against a run planned long from the start is tests/integration/test_wsd_extend_run.py.

Invariants, for a wsd run of 10 steps (cooldown past step 7, 0-based: steps 9 and 10):
- with checkpointing on, the last state before the cooldown (step 8) is saved, marked in its
  state.json, and kept by the rotation while checkpoint.keep = 1 deletes the others; only the
  newest such checkpoint is kept; a cosine run saves and keeps nothing extra;
- `--resume auto` takes the kept checkpoint when train.max_steps grows, the newest otherwise;
- a checkpoint inside the cooldown, given by path, is refused, naming the one to extend from.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bigbatch.config.sections import CheckpointConfig
from bigbatch.engine.loop import TrainState
from bigbatch.errors import UsageError
from bigbatch.run.checkpoint_files import list_checkpoints
from bigbatch.run.resume import find_resume_checkpoint
from test_checkpoint import FULL_BATCH_TOKENS, checkpointer_for, small_objects

pytestmark = pytest.mark.usefixtures("single_thread")


def run_objects(decay: str = "wsd", max_steps: int = 10):
    cfg, *live = small_objects()
    cfg = replace(cfg, optim=replace(cfg.optim, decay=decay, warmup_steps=2),
                  train=replace(cfg.train, max_steps=max_steps),
                  checkpoint=CheckpointConfig(every_steps=3, keep=1))
    return (cfg, *live)


def train_steps(checkpointer, steps) -> None:
    for step in steps:  # the full batch every step
        checkpointer.maybe_save(TrainState(step=step, tokens_seen=step * FULL_BATCH_TOKENS))


def names(run_dir) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir / "checkpoints")]


def test_the_last_checkpoint_before_the_cooldown_is_written_and_kept(tmp_path):
    train_steps(checkpointer_for(tmp_path, run_objects()), range(1, 11))
    # every 3 steps: 3, 6, 9; and step 8, the last before the cooldown; keep = 1 keeps 9 and 8.
    assert names(tmp_path) == ["step-00000008", "step-00000009"]
    marks = [json.loads((p / "state.json").read_text())["before_cooldown"]
             for p in list_checkpoints(tmp_path / "checkpoints")]
    assert marks == [True, False]

    cosine = tmp_path / "cosine"
    train_steps(checkpointer_for(cosine, run_objects("cosine")), range(1, 11))
    assert names(cosine) == ["step-00000009"]


def test_only_the_newest_checkpoint_before_the_cooldown_is_kept(tmp_path):
    train_steps(checkpointer_for(tmp_path, run_objects()), range(1, 8))
    assert names(tmp_path) == ["step-00000006"]  # step 3, before the cooldown too, went


def test_resume_auto_extends_from_the_kept_checkpoint_and_refuses_one_in_the_cooldown(tmp_path):
    train_steps(checkpointer_for(tmp_path, run_objects()), range(1, 11))
    checkpoints = tmp_path / "checkpoints"

    def found(max_steps: int):
        return find_resume_checkpoint("auto", tmp_path, print, max_steps).name

    assert found(10) == "step-00000009"  # the same length: the newest, as always
    assert found(20) == "step-00000008"  # longer: the last before the cooldown

    longer = checkpointer_for(tmp_path, run_objects(max_steps=20))
    with pytest.raises(UsageError) as err:
        longer.restore(checkpoints / "step-00000009", TrainState())
    line = str(err.value)
    assert "\n" not in line and "inside the cooldown of its 10 steps" in line
    assert f"extend from {checkpoints / 'step-00000008'}" in line
    assert names(tmp_path) == ["step-00000008", "step-00000009"]  # nothing removed

    said = []
    longer.say = said.append
    state = TrainState()
    longer.restore(checkpoints / "step-00000008", state)
    assert state.step == 8 and said[0] == (
        f"resume: extending the run from 10 to 20 steps from {checkpoints / 'step-00000008'} "
        "(the last before the cooldown)")
    assert names(tmp_path) == ["step-00000008"]  # step 9 was the abandoned cooldown's
