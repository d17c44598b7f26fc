"""A full disk on a small tmpfs (run/disk_space.py): refused before training when the final model
and one checkpoint do not fit; a checkpoint or the final model that does not fit later stops the
run with one line (path, bytes needed, bytes free, exit 2), leaves no temporary files, and the
last good checkpoint resumes with `--resume auto` once space is freed, bit-identically to a run
that was never interrupted (metrics rows and final weights).

Needs `mount -t tmpfs` (root); skipped, saying why, where mounting is not permitted. Slow: each
test trains several runs (tests/README.md)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigbatch.errors import UsageError
from bigbatch.run import checkpoint
from bigbatch.run.checkpoint_files import list_checkpoints, verify_checkpoint
from bigbatch.run.train import train
from small_runs import cli_command, metric_rows, small_args, small_config

NO_TRACKERS = "--train.trackers=[]"


@contextlib.contextmanager
def tmpfs(where: Path, size: int):
    where.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): "
                    "these tests need root (CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def files_bytes(directory: Path, names=None) -> int:
    return sum(p.stat().st_size for p in directory.iterdir()
               if p.is_file() and (names is None or p.name in names))


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def leftovers(out: Path) -> list[str]:
    return [p.name for p in [*out.iterdir(), *(out / "checkpoints").glob("*")]
            if p.name.startswith((".tmp-", ".old-"))]


def cli_train(tiny: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command("train", *small_args(tiny, NO_TRACKERS, *extra),
                                      "--out", str(out)), capture_output=True, text=True,
                          timeout=600)


FINAL = ("model.safetensors", "model.json", "tokenizer.json")


def test_a_checkpoint_that_does_not_fit_stops_the_run_and_the_last_one_resumes(
        tiny_overrides, tmp_path):
    every = ("--checkpoint.every_steps=2", "--checkpoint.keep=2")
    reference = tmp_path / "reference"
    assert cli_train(tiny_overrides, reference, *every).returncode == 0
    ckpt = files_bytes(list_checkpoints(reference / "checkpoints")[0])
    final = files_bytes(reference, FINAL)
    # Room for the final model and 1.3 checkpoints: step 2's fits, step 4's does not.
    with tmpfs(tmp_path / "disk", final + int(1.3 * ckpt) + (64 << 10)) as disk:
        out = disk / "run"
        failed = cli_train(tiny_overrides, out, *every)
        assert failed.returncode == 2, failed.stderr[-3000:]
        line = failed.stderr.strip().splitlines()[-1]
        assert "Traceback" not in failed.stderr
        assert f"could not write checkpoint {out}/checkpoints/step-00000004: No space left" in line
        assert "the write needed about" in line and "was free on" in line
        assert "step-00000002 (step 2), is intact" in line and "--resume auto" in line
        assert leftovers(out) == []
        saved = list_checkpoints(out / "checkpoints")
        assert [p.name for p in saved] == ["step-00000002"] and verify_checkpoint(saved[0]) is None

        resize(disk, 64 << 20)  # space freed
        resumed = cli_train(tiny_overrides, out, *every, "--resume", "auto")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
        assert metric_rows(out) == metric_rows(reference)
        same_weights(out, reference)


def test_a_final_model_that_does_not_fit_stops_the_run_and_the_last_checkpoint_resumes(
        tiny_overrides, tmp_path, monkeypatch):
    cfg = small_config(tiny_overrides, NO_TRACKERS, "--checkpoint.every_steps=4")
    reference = train(cfg, tmp_path / "reference", verbose=False, report=False).out_dir
    with tmpfs(tmp_path / "disk", 64 << 20) as disk:
        out, filler = disk / "run", disk / "filler"
        real_save = checkpoint.Checkpointer.save

        def save_then_fill_the_disk(self, state):  # a neighbour fills the disk after step 4
            path = real_save(self, state)
            fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
            os.posix_fallocate(fd, 0, os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                               - (100 << 10))
            os.close(fd)
            return path

        monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_fill_the_disk)
        with pytest.raises(UsageError) as err:
            train(cfg, out, verbose=False, report=False)
        line = str(err.value)
        assert "\n" not in line
        assert f"could not write the final model into {out}: No space left on device" in line
        assert "the write needed about" in line and "was free on" in line
        assert "step-00000004 (step 4), is intact" in line
        assert "the 2 step(s) after it are trained again" in line
        assert leftovers(out) == [] and not (out / "model.safetensors").exists()
        assert verify_checkpoint(out / "checkpoints" / "step-00000004") is None

        monkeypatch.undo()
        filler.unlink()  # space freed
        train(cfg, out, verbose=False, report=False, resume="auto")
        assert metric_rows(out) == metric_rows(reference)
        same_weights(out, reference)


def test_a_disk_without_room_for_the_final_model_and_a_checkpoint_is_refused_before_training(
        tiny_overrides, tmp_path):
    with tmpfs(tmp_path / "disk", 1 << 20) as disk:
        out = disk / "run"
        refused = cli_train(tiny_overrides, out)
        assert refused.returncode == 2, refused.stderr[-3000:]
        line = refused.stderr.strip()
        assert "\n" not in line and "Traceback" not in line
        assert f"--out '{out}' has 1" in line and "free but this run needs about" in line
        assert "for the final model" in line and "for a checkpoint" in line
        assert not (out / "metrics.jsonl").exists()  # not a step trained
