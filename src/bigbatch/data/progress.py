"""Feedback while a corpus is prepared: a tqdm bar (bytes, tokens, rate, time left) on a
terminal, a plain line every `every_s` seconds (and at the end) anywhere else."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from bigbatch.config.units import format_bytes


class PrepareProgress:
    def __init__(self, phase: str, total_bytes: int, initial_bytes: int = 0,
                 stream: TextIO | None = None, every_s: float = 15.0) -> None:
        self.phase, self.total = phase, max(total_bytes, 1)
        self.stream, self.every_s = stream or sys.stderr, every_s
        self.done_bytes, self.tokens = initial_bytes, 0
        self.started = self.last_line = time.perf_counter()
        self.start_bytes = initial_bytes
        self.bar = None
        if self.stream.isatty():
            self.bar = tqdm(total=self.total, initial=initial_bytes, desc=f"data: {phase}",
                            unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
                            dynamic_ncols=True)

    def add_bytes(self, num_bytes: int) -> None:
        self.done_bytes += num_bytes
        if self.bar is not None:
            self.bar.update(num_bytes)
        elif time.perf_counter() - self.last_line >= self.every_s:
            self.print_line()

    def add_tokens(self, num_tokens: int) -> None:
        self.tokens += num_tokens
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.tokens:,} tokens", refresh=False)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = (self.done_bytes - self.start_bytes) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done_bytes) / rate if rate > 0 else 0.0
        done = min(self.done_bytes, self.total)
        tokens = f" | {self.tokens:,} tokens" if self.tokens else ""
        return (f"data: {self.phase} {format_bytes(done)} / {format_bytes(self.total)} "
                f"({100 * done / self.total:.0f}%){tokens} | {format_bytes(rate)}/s | "
                f"{elapsed:.0f}s elapsed, {left:.0f}s left")

    def print_line(self) -> None:
        self.last_line = time.perf_counter()
        print(self.line(), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self.print_line()
