"""Checkpoint files: atomic, checksummed, complete, and never executing code when loaded."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from bigbatch.batch import split_batch
from bigbatch.config.sections import CheckpointConfig, Config
from bigbatch.data.loader import TokenLoader
from bigbatch.engine.loop import TrainState
from bigbatch.engine.precision import make_precision
from bigbatch.errors import UsageError
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.optim.registry import build_optimizer
from bigbatch.parallel.process_group import SINGLE_PROCESS
from bigbatch.run.checkpoint import Checkpointer
from bigbatch.run.checkpoint_files import list_checkpoints, verify_checkpoint, write_checkpoint
from bigbatch.run.resume import find_resume_checkpoint

CPU = torch.device("cpu")


def text_writers(payload: str) -> dict:
    return {"a.txt": lambda path: path.write_text(payload),
            "b.bin": lambda path: path.write_bytes(payload.encode() * 100)}


def test_write_verify_and_fall_back_from_damage(tmp_path):
    """A checkpoint is valid until any byte of any file changes; `auto` then takes the one
    before, with one warning line per damaged checkpoint skipped."""
    directory = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        write_checkpoint(directory, step, text_writers(f"step {step}"))
    (directory / ".tmp-step-00000004-123").mkdir()  # a save killed part-way
    assert [p.name for p in list_checkpoints(directory)] == [
        "step-00000001", "step-00000002", "step-00000003"]
    assert all(verify_checkpoint(p) is None for p in list_checkpoints(directory))

    newest, middle = directory / "step-00000003", directory / "step-00000002"
    with (newest / "b.bin").open("r+b") as f:  # truncated
        f.truncate(10)
    data = bytearray((middle / "a.txt").read_bytes())
    data[0] ^= 1  # one flipped bit, same size
    (middle / "a.txt").write_bytes(bytes(data))
    assert "truncated" in verify_checkpoint(newest)
    assert "sha256" in verify_checkpoint(middle)

    warnings: list[str] = []
    found = find_resume_checkpoint("auto", tmp_path, warnings.append)
    assert found == directory / "step-00000001"
    assert len(warnings) == 2 and all("unusable" in w for w in warnings)

    (found / "manifest.json").unlink()
    assert "incomplete" in verify_checkpoint(found)
    with pytest.raises(UsageError, match="none of the 3 checkpoints"):
        find_resume_checkpoint("auto", tmp_path, warnings.append)
    assert find_resume_checkpoint("auto", tmp_path / "fresh", warnings.append) is None


def test_full_disk_leaves_the_previous_checkpoint_intact(tmp_path):
    directory = tmp_path / "checkpoints"
    write_checkpoint(directory, 1, text_writers("good"))

    def full_disk(path):
        path.write_text("partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UsageError, match="No space left on device") as err:
        write_checkpoint(directory, 2, {"a.txt": full_disk})
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000001"]  # no temp left
    assert verify_checkpoint(directory / "step-00000001") is None


FULL_BATCH_TOKENS = 16 * 8  # small_objects' global batch


def small_objects(seed: int = 0):
    """A model (initialised from `seed`), optimizer, scaler and loader over a fixed corpus,
    small enough to build in milliseconds."""
    torch.manual_seed(seed)
    cfg = Config()
    model = GPT(GPTShape(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16, dropout=0.1))
    optimizer = build_optimizer(model, cfg.optim, CPU)
    plan = split_batch(global_tokens=FULL_BATCH_TOKENS, seq_len=16, micro_batch_size=4)
    tokens = np.random.default_rng(0).integers(0, 63, size=4096).astype(np.uint16)
    loader = TokenLoader(tokens, 63, plan, rank=0, seed=1)
    scaler = make_precision(cfg.precision, CPU).scaler
    return cfg, model, optimizer, scaler, loader


def checkpointer_for(run_dir, objects) -> Checkpointer:
    cfg, model, optimizer, scaler, loader = objects
    return Checkpointer(run_dir, cfg, model=model, optimizer=optimizer, scaler=scaler,
                        loader=loader, dist=SINGLE_PROCESS, device=CPU,
                        full_batch_tokens=FULL_BATCH_TOKENS, say=lambda line: None)


def rng_draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_restore_brings_back_every_piece_of_state(tmp_path):
    """Invariant: after restore, a freshly built set of objects equals the saved one: weights
    (with lm_head still tied to wte), optimizer moments and step counts, loader position,
    TrainState, and the next draws of the Python, NumPy and torch generators."""
    objects = small_objects(seed=0)
    _, model, optimizer, _, loader = objects
    for _ in range(2):  # real optimizer state: moments and step counts
        batch = loader.next_step()[0]
        torch.nn.functional.cross_entropy(model(batch.inputs).flatten(0, 1),
                                          batch.targets.flatten(), ignore_index=-100).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = TrainState(step=2, tokens_seen=256, skipped_steps=1, last_val_loss=3.5)
    saved = checkpointer_for(tmp_path, objects).save(state)
    expected_draws = rng_draws()
    expected_batch = loader.next_step()[0].inputs

    fresh = small_objects(seed=1)
    restored = TrainState()
    checkpointer_for(tmp_path, fresh).restore(saved, restored)
    _, model2, optimizer2, _, loader2 = fresh
    assert restored == state
    assert rng_draws() == expected_draws
    assert torch.equal(loader2.next_step()[0].inputs, expected_batch)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert model2.lm_head.weight is model2.wte.weight
    for s1, s2 in zip(optimizer.state.values(), optimizer2.state.values(), strict=True):
        for key in s1:
            assert torch.equal(s1[key], s2[key]), key


class RunsCode:
    """What a malicious pickle looks like: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_loading_never_executes_pickled_code(tmp_path):
    objects = small_objects()
    path = checkpointer_for(tmp_path, objects).save(TrainState(step=1))
    marker = tmp_path / "pwned"
    torch.save({"state": RunsCode(marker)}, path / "optimizer.pt")
    manifest = json.loads((path / "manifest.json").read_text())  # re-signed: checksums agree
    manifest["files"]["optimizer.pt"] = {
        "bytes": (path / "optimizer.pt").stat().st_size,
        "sha256": hashlib.sha256((path / "optimizer.pt").read_bytes()).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert verify_checkpoint(path) is None

    with pytest.raises(UsageError, match="refusing to load"):
        checkpointer_for(tmp_path, small_objects()).restore(path, TrainState())
    assert not marker.exists()


def test_checkpoints_by_steps_and_by_minutes_with_rotation(tmp_path):
    cfg, *live = small_objects()
    model, optimizer, scaler, loader = live
    by_time = Checkpointer(tmp_path, replace(cfg, checkpoint=CheckpointConfig(
        every_steps=3, every_minutes=1.0, keep=2)), model=model, optimizer=optimizer,
        scaler=scaler, loader=loader, dist=SINGLE_PROCESS, device=CPU,
        full_batch_tokens=FULL_BATCH_TOKENS, say=lambda line: None)
    by_time.maybe_save(TrainState(step=1))
    assert list_checkpoints(tmp_path / "checkpoints") == []  # neither 3 steps nor a minute
    by_time.last_time -= 61
    by_time.maybe_save(TrainState(step=2))  # a minute has passed
    by_time.maybe_save(TrainState(step=3))  # every 3 steps
    by_time.maybe_save(TrainState(step=4, bad_steps_in_row=1))  # never during a bad streak
    by_time.last_time -= 61
    by_time.maybe_save(TrainState(step=5))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step-00000003", "step-00000005"]  # keep = 2
