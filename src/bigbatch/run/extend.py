"""Extending a finished (or stopped) warmup-stable-decay run: `bigbatch train RECIPE --out RUN
--resume auto --train.max_steps=M` with M beyond the run's own max_steps.

A wsd run holds the peak lr until its cooldown, so everything it trained before the cooldown is
also what a run planned for M steps from the start trains (`wsd_cooldown_start` only grows with
max_steps). The run therefore continues from its newest checkpoint before the cooldown, which
the Checkpointer keeps for that purpose (its state.json says `"before_cooldown": true`), and the
schedule then ends at M, its cooldown moved to the new end: bit for bit the longer run. Cosine
and linear decay depend on max_steps at every step, so they cannot be extended without a jump.
This applies to a resume of the run in --out (`--resume auto`, or a PATH inside it); a checkpoint
of another run directory starts a new run from its weights, with its own schedule.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigbatch.errors import UsageError
from bigbatch.run.checkpoint_files import list_checkpoints, verify_checkpoint

# The settings a resume may change without changing any result (up to reduction order): how
# often to checkpoint, how to spread the work over ranks, where metrics go. As
# `config_changes` lines ("section.key: old -> new").
RESULT_NEUTRAL = ("checkpoint.", "parallel.", "train.trackers:")
# Decays whose lr does not depend on max_steps: a longer run continues any checkpoint exactly.
UNBOUNDED_DECAYS = ("constant",)


def saved_meta(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return None


def marked_before_cooldown(path: Path) -> bool:
    meta = saved_meta(path)
    return bool(meta and meta.get("before_cooldown"))


def extends(saved_config: dict[str, Any], max_steps: int) -> bool:
    """Whether `max_steps` lengthens the run whose config was `saved_config`."""
    return max_steps > saved_config.get("train", {}).get("max_steps", max_steps)


def extension_start(newest: Path, max_steps: int, warn: Callable[[str], None]) -> Path:
    """`--resume auto` on rank 0: where a wsd run lengthened to `max_steps` continues from (the
    newest intact checkpoint marked before the cooldown); `newest` (the newest intact checkpoint)
    when this is no wsd extension, or none is marked, for `check_extension` to refuse."""
    meta = saved_meta(newest) or {}
    config = meta.get("config", {})
    if not extends(config, max_steps) or config.get("optim", {}).get("decay") != "wsd":
        return newest
    for path in reversed(list_checkpoints(newest.parent)):
        if path.name > newest.name or not marked_before_cooldown(path):
            continue
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"checkpoint {path} is unusable: {problem}; trying the one before it")
    return newest


def check_extension(path: Path, meta: dict[str, Any], now: dict[str, Any],
                    changes: list[str]) -> str | None:
    """Before restoring `path` (its state.json `meta`) into a run of config `now`, whose settings
    differ from the checkpoint's by `changes` (`config_changes` lines): None when max_steps did
    not grow (an ordinary resume), the line to say when this is a wsd extension, and a one-line
    UsageError when it cannot be one."""
    saved = meta["config"]
    old, new = saved["train"]["max_steps"], now["train"]["max_steps"]
    decay = saved["optim"]["decay"]
    if not extends(saved, new) or decay in UNBOUNDED_DECAYS:
        return None
    if decay != "wsd":
        raise UsageError(
            f"--train.max_steps={new} extends a run trained for {old} steps with optim.decay = "
            f"{decay!r}, whose decay spans all {old} steps: continuing it would jump the learning "
            f"rate back up; resume with --train.max_steps={old}, or train the longer run in a new "
            "--out with optim.decay = \"wsd\" (which can be extended from its last checkpoint "
            "before the cooldown)")
    others = [c for c in changes
              if not c.startswith(("train.max_steps:", *RESULT_NEUTRAL))]
    if others:
        raise UsageError(
            f"--train.max_steps={new} extends the run, but other settings changed too "
            f"({'; '.join(others)}): an extension continues the same run for longer; change only "
            "train.max_steps, or start a new --out")
    if not meta.get("before_cooldown"):
        kept = [p for p in list_checkpoints(path.parent) if marked_before_cooldown(p)]
        what = (f"extend from {kept[-1]}, the last before the cooldown (--resume auto takes it)"
                if kept else "no checkpoint before the cooldown is kept: resume with "
                f"--train.max_steps={old}, or train the longer run from the start in a new --out")
        raise UsageError(f"--train.max_steps={new} cannot extend the run from checkpoint {path}, "
                         f"which is inside the cooldown of its {old} steps; {what}")
    return (f"resume: extending the run from {old:,} to {new:,} steps from {path} "
            "(the last before the cooldown)")
