"""Where a run resumes from (`bigbatch train --resume auto|PATH`), and what it must not clobber.

`auto` takes the newest intact checkpoint in the run directory (`--out`); a damaged newer one is
reported on one warning line and the one before it used. A larger `train.max_steps` than the
run's extends a wsd run from its last checkpoint before the cooldown instead (run/extend.py). With no checkpoint at all, `auto`
starts at step 0, so a job script can always pass `--resume auto`. metrics.jsonl keeps one row
per step: the rows the interrupted attempt logged after its checkpoint are dropped on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bigbatch.errors import UsageError
from bigbatch.run.checkpoint_files import MANIFEST, NAME, list_checkpoints, verify_checkpoint
from bigbatch.run.extend import extension_start

if TYPE_CHECKING:  # torch only where it is used: the --nproc launcher checks without it
    from bigbatch.parallel.process_group import DistInfo


def newest_valid(directory: Path, warn: Callable[[str], None]) -> Path | None:
    """The newest intact checkpoint; each newer, damaged one is reported through `warn`."""
    candidates = list_checkpoints(directory)
    for path in reversed(candidates):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"checkpoint {path} is unusable: {problem}; trying the one before it")
    if candidates:
        raise UsageError(f"none of the {len(candidates)} checkpoints in {directory} is intact: "
                         "start a new run with another --out")
    return None


def find_resume_checkpoint(resume: str, out_dir: Path, warn: Callable[[str], None],
                           max_steps: int | None = None) -> Path | None:
    """`--resume auto`: the newest intact checkpoint of `out_dir`, or None for a fresh start; a
    wsd run lengthened to `max_steps` continues from its newest one before the cooldown.
    `--resume PATH`: that checkpoint directory, or the newest intact one of that run directory."""
    if resume == "auto":
        newest = newest_valid(out_dir / "checkpoints", warn)
        if newest is None or max_steps is None:
            return newest
        return extension_start(newest, max_steps, warn)
    path = Path(resume)
    if (path / MANIFEST).exists() or NAME.fullmatch(path.name):
        problem = verify_checkpoint(path)
        if problem is not None:
            raise UsageError(f"--resume {resume!r} is not a usable checkpoint: {problem}")
        return path
    found = newest_valid(path / "checkpoints", warn)
    if found is None:
        raise not_resumable(resume)
    return found


def not_resumable(resume: str) -> UsageError:
    return UsageError(f"--resume {resume!r} is neither a checkpoint directory nor a run "
                      "directory holding checkpoints: give one, or --resume auto")


def agree_on_resume_checkpoint(resume: str | None, out_dir: Path, dist: DistInfo,
                               warn: Callable[[str], None], max_steps: int | None = None
                               ) -> Path | None:
    """`find_resume_checkpoint` on rank 0 only, its answer broadcast: every rank resumes from the
    same checkpoint (a checkpoint rank 0 is still renaming into place could otherwise be seen by
    one rank and not another), and only one rank reads every file for its checksums. A refusal
    is raised on every rank, so none is left waiting for the others."""
    if resume is None:
        return None
    from bigbatch.parallel.process_group import broadcast_from_main

    found, problem = None, None
    if dist.is_main:
        try:
            found = find_resume_checkpoint(resume, out_dir, warn, max_steps)
        except UsageError as err:
            problem = str(err)
    found, problem = broadcast_from_main((found, problem), dist)
    if problem is not None:
        raise UsageError(problem)
    return found


# What a run writes into its directory (train.py, its tasks, checkpoint.py,
# run_info.py, the report, the planner). A directory holding any of them holds a previous run.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "config.toml", "run_info.json", "tensorboard",
               "model.safetensors", "model.json", "tokenizer.json", "config.json",
               "labels.json", "plan.json", "report.html", "wandb", "mlruns")


def previous_run_outputs(out_dir: Path) -> list[str]:
    """The names in `out_dir` that a run wrote (checkpoints/ only when it holds one)."""
    found = [name for name in RUN_OUTPUTS if name != "checkpoints" and (out_dir / name).exists()]
    if list_checkpoints(out_dir / "checkpoints"):
        found.insert(0, "checkpoints")
    return found


def refuse_mixed_runs(out_dir: Path, resume: str | None, overwrite: bool) -> list[str]:
    """Refuse to mix a new run into a directory that holds another run's outputs: its
    metrics.jsonl would be appended to, its report would draw two runs as one. Returns the
    outputs `overwrite` is to remove (none when resuming)."""
    if overwrite and resume is not None:
        raise UsageError(f"--overwrite and --resume {resume} contradict each other: --resume "
                         "continues the run in --out, --overwrite discards it")
    found = previous_run_outputs(out_dir)
    if not found or resume is not None:
        return []
    if not overwrite:
        newest = list_checkpoints(out_dir / "checkpoints")
        what = ", ".join(f"checkpoints/ (newest {newest[-1].name})" if name == "checkpoints"
                         else name for name in found)
        raise UsageError(f"--out {str(out_dir)!r} already holds a run ({what}): choose another "
                         "--out, add --resume auto to continue it, or --overwrite to replace it")
    return found


def check_before_launch(out_dir: Path, resume: str | None, overwrite: bool) -> None:
    """What `--nproc` refuses before torchrun starts, in one cheap look (no checksums, nothing
    removed): rank 0 checks again, fully, in train()."""
    refuse_mixed_runs(out_dir, resume, overwrite)
    if resume not in (None, "auto") and not Path(resume).exists():
        raise not_resumable(resume)


def check_out_dir(out_dir: Path, resume: str | None, overwrite: bool = False) -> None:
    """refuse_mixed_runs; `overwrite` removes the previous run's outputs first (and only those:
    other files in the directory stay)."""
    for name in refuse_mixed_runs(out_dir, resume, overwrite):
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def drop_metrics_after(path: Path, step: int) -> int:
    """Rewrite metrics.jsonl without the rows of steps after `step` (logged by the attempt that
    was interrupted, and about to be logged again). Returns the last step the file held before
    (-1 for none): how far that attempt had sent its rows to the trackers too."""
    if not path.is_file():
        return -1
    kept, last = [], -1
    for line in path.read_text().splitlines(keepends=True):
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a half-written last line from a killed process
        last = max(last, row_step)
        if row_step <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return last
