"""Room on `--out` for what a run saves: checked before training, said when a save finds none.

Before training, rank 0 estimates the final model's bytes and one checkpoint's (the weights a
checkpoint holds plus the optimizer's state, which the optimizer registry counts per parameter)
and refuses to start when they do not fit in what is free. When a save later runs out of space
(torch.save raises RuntimeError and safetensors its own error, not OSError), the one line names
the path, the bytes the write needed and what was free.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigbatch.config.units import format_bytes
from bigbatch.errors import UsageError
from bigbatch.model.adapters import is_adapted
from bigbatch.optim.registry import optimizer_entry, trainable_parameters

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in `obj` (nested dicts, lists and tuples of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _bytes(params: Iterable[tuple[str, torch.Tensor]]) -> int:
    return sum(p.numel() * p.element_size() for _, p in params)


def estimated_save_bytes(model: nn.Module, optimizer_name: str) -> tuple[int, int]:
    """(the final model, one checkpoint) in bytes, estimated from `model`'s parameters (a tied
    weight once) and the state `optimizer_name` keeps for the trainable ones."""
    everything = _bytes(model.named_parameters()) + _bytes(model.named_buffers())
    trainable = trainable_parameters(model)
    entry = optimizer_entry(optimizer_name)
    optimizer = sum(entry.state_tensors(n, p) * p.numel() * p.element_size()
                    for n, p in trainable)
    if is_adapted(model):  # the merged model and, beside it, the adapters; a checkpoint: those
        return everything + _bytes(trainable), _bytes(trainable) + optimizer
    return everything, everything + optimizer


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_room_to_save(out_dir: Path, model: nn.Module, optimizer_name: str, keep: int,
                       warn) -> None:
    """Refuse (one line) when the final model and one checkpoint do not fit in what is free on
    `out_dir`'s file system; warn when the `keep` checkpoints a long run holds (and the one
    being written before the oldest goes) might not."""
    final, checkpoint = estimated_save_bytes(model, optimizer_name)
    free = free_bytes(out_dir)
    needed = final + checkpoint
    if needed > free:
        raise UsageError(f"--out {str(out_dir)!r} has {format_bytes(free)} free but this run "
                         f"needs about {format_bytes(needed)} ({format_bytes(final)} for the "
                         f"final model, {format_bytes(checkpoint)} for a checkpoint of weights "
                         "and optimizer state): free space or choose another --out")
    most = final + (keep + 1) * checkpoint
    if most > free:
        warn(f"--out {str(out_dir)!r} has {format_bytes(free)} free; with checkpoint.keep = "
             f"{keep} this run may need up to {format_bytes(most)} ({keep + 1} checkpoints of "
             f"{format_bytes(checkpoint)} while the oldest is replaced, and the final model of "
             f"{format_bytes(final)}): the run stops with a one-line error if the disk fills")


def is_disk_full(err: BaseException, directory: Path, needed: int | None) -> bool:
    """Whether `err`, raised while writing `needed` bytes into `directory` (whatever was written
    already removed), means the disk was full: ENOSPC/EDQUOT, or a library's own error
    (torch.save's RuntimeError, SafetensorError) while less than `needed` is free."""
    if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
        return True
    if "No space left on device" in str(err) or "os error 28" in str(err):
        return True
    try:
        return needed is not None and free_bytes(directory) < needed
    except OSError:
        return False


def disk_full_line(what: str, directory: Path, needed: int | None) -> str:
    try:
        free = format_bytes(free_bytes(directory))
    except OSError:
        free = "an unknown amount"
    need = f"about {format_bytes(needed)}" if needed is not None else "more"
    return (f"could not write {what}: No space left on device (the write needed {need}, "
            f"{free} was free on {directory})")


FINAL_TMP = ".tmp-final-"


def save_final_model(save: Callable[[nn.Module, dict, Path], None], model: nn.Module,
                     weights: dict[str, torch.Tensor], out_dir: Path) -> None:
    """The task's `save(model, weights, directory)` into a temporary directory inside `out_dir`,
    each file then renamed into place: a save that finds the disk full leaves nothing behind (no
    half model.safetensors), and says so in one line naming the bytes it needed and what was
    free. A temporary directory left by a killed process is removed first."""
    for stale in out_dir.glob(f"{FINAL_TMP}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f"{FINAL_TMP}{os.getpid()}"
    try:
        tmp.mkdir()
        save(model, weights, tmp)
        for path in sorted(tmp.iterdir()):
            target = out_dir / path.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(path, target)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        needed = tensor_bytes(weights)
        if is_disk_full(err, out_dir, needed):
            raise UsageError(disk_full_line(f"the final model into {out_dir}", out_dir, needed)
                             ) from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)
