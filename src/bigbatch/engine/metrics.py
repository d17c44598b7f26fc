"""Run outputs for people and programs: metrics.jsonl, TensorBoard events, a progress display.

Only rank 0 writes; the values it writes were already reduced across ranks by train_step.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm


def peak_memory_bytes(device: torch.device) -> int:
    """High-water mark so far: on CUDA the bytes PyTorch's allocator handed out on `device` (an
    allocator counter, no device sync); elsewhere the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


class MetricsLog:
    """One JSON object per line in `metrics.jsonl`, mirrored as TensorBoard scalars."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._file: TextIO | None = None
        self._board = None
        if enabled:
            self._file = (out_dir / "metrics.jsonl").open("a", buffering=1)
            from torch.utils.tensorboard import SummaryWriter  # slow import: only on rank 0
            self._board = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None and self._board is not None
        self._file.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self._board.add_scalar(key, value, global_step=row["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._board is not None:
            self._board.close()


class Progress:
    """A tqdm bar on a terminal; plain log lines (every `log_every` steps) elsewhere."""

    def __init__(self, total_steps: int, initial_step: int, log_every: int,
                 enabled: bool = True, stream: TextIO = sys.stderr) -> None:
        self.enabled, self.log_every, self.stream = enabled, log_every, stream
        self.total_steps = total_steps
        self.start_time = time.perf_counter()
        self.start_step = initial_step
        self.bar = None
        if enabled and stream.isatty():
            self.bar = tqdm(total=total_steps, initial=initial_step, file=stream,
                            unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | lr {lr:.2e}")
            self.bar.update(1)
        elif step % self.log_every == 0 or step == self.total_steps:
            elapsed = time.perf_counter() - self.start_time
            done = step - self.start_step
            left = elapsed / done * (self.total_steps - step) if done else 0.0
            print(f"step {step}/{self.total_steps} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s"
                  f" | lr {lr:.2e} | {left:.0f}s left", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
