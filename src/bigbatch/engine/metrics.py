"""Run outputs for people and programs: metrics.jsonl (fanned out to the trackers), a progress
display.

Only rank 0 writes; the values it writes were already reduced across ranks by train_step.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from bigbatch.engine.trackers import Tracker


def peak_memory_bytes(device: torch.device) -> int:
    """High-water mark so far: on CUDA the bytes PyTorch's allocator handed out on `device` (an
    allocator counter, no device sync); elsewhere the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


class MetricsLog:
    """One JSON object per line in `metrics.jsonl`, each also sent to the run's trackers
    (engine/trackers.py: TensorBoard, W&B, MLflow), which `close` hands the run's final files.
    A tracker that raises is a warning, once, and is dropped: the file gets every row."""

    def __init__(self, out_dir: Path, enabled: bool = True,
                 trackers: Sequence[Tracker] = ()) -> None:
        self.enabled = enabled
        self._file: TextIO | None = None
        self._trackers = list(trackers)
        if enabled:
            self._file = (out_dir / "metrics.jsonl").open("a", buffering=1)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(row) + "\n")
        for tracker in list(self._trackers):
            try:
                tracker.write(row)
            except Exception as err:  # a server gone mid-run: the run and metrics.jsonl go on
                self._trackers.remove(tracker)  # not asked again: each call could wait out retries
                reason = (str(err).strip().splitlines() or [""])[0]
                print(f"bigbatch: warning: {type(tracker).__name__} failed at step "
                      f"{row.get('step')} ({type(err).__name__}: {reason}); it gets no more "
                      "rows, metrics.jsonl keeps them all", file=sys.stderr, flush=True)

    def close(self, artifacts: Sequence[Path] = (), ok: bool = True) -> None:
        """Hand the trackers `artifacts` (those that exist) and close everything; `ok=False`
        marks their runs failed. Only the first call acts. A tracker that fails here is a
        warning: the run's outputs are already on disk."""
        if self._file is not None:
            self._file.close()
            self._file = None
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            try:
                if ok:
                    tracker.log_artifacts([path for path in artifacts if path.is_file()])
                tracker.close(ok)
            except Exception as err:
                print(f"bigbatch: warning: could not finish {type(tracker).__name__}: "
                      f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)


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
