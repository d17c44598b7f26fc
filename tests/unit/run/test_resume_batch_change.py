"""A resume that changed the global batch is refused in one line naming the old and the new value
and how to continue (the old value); a cbs branch (`branch=True`) may change it.

Why refused: the checkpoint's step counts steps of the old batch, the schedule's end
(`train.max_steps` steps) and warmup are counted in tokens of the new one, so the progress read
"step 10/8" with a negative time left, the learning rate jumped at the resume and the run ended at
another step than it said (README "Checkpoints, resuming, stopping").
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from bigbatch.engine.loop import TrainState
from bigbatch.errors import UsageError
from bigbatch.run.checkpoint import Checkpointer
from bigbatch.run.resume import find_resume_checkpoint
from test_checkpoint import CPU, FULL_BATCH_TOKENS, SINGLE_PROCESS, checkpointer_for, small_objects

pytestmark = pytest.mark.usefixtures("single_thread")


def with_batch(objects, **batch):
    cfg, *rest = objects
    return (replace(cfg, batch=replace(cfg.batch, **batch)), *rest)


def restore_into(run_dir, objects, path, branch=False) -> TrainState:
    cfg, model, optimizer, scaler, loader = objects
    checkpointer = Checkpointer(run_dir, cfg, model=model, optimizer=optimizer, scaler=scaler,
                                loader=loader, dist=SINGLE_PROCESS, device=CPU,
                                full_batch_tokens=FULL_BATCH_TOKENS, say=lambda line: None)
    state = TrainState()
    checkpointer.restore(path, state, branch=branch)
    return state


@pytest.mark.parametrize("key, old, new", [("global_tokens", 2048, 4096),
                                           ("global_sequences", 32, 16)])
def test_a_changed_global_batch_is_refused_naming_both_values(tmp_path, key, old, new):
    saved = checkpointer_for(tmp_path, with_batch(small_objects(), **{key: old})).save(
        TrainState(step=5, tokens_seen=5 * 2048))
    assert find_resume_checkpoint("auto", tmp_path, print) == saved

    with pytest.raises(UsageError) as err:
        restore_into(tmp_path, with_batch(small_objects(), **{key: new}), saved)
    line = str(err.value)
    assert "\n" not in line
    assert f"batch.{key} = {new}" in line and f"trained with {old}" in line
    assert f"resume with --batch.{key}={old}" in line

    # The same batch resumes; a branch (cbs) may change it and counts its own steps.
    assert restore_into(tmp_path, with_batch(small_objects(), **{key: old}), saved).step == 5
    assert restore_into(tmp_path, with_batch(small_objects(), **{key: new}), saved,
                        branch=True).step == 5
