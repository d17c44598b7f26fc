"""Stop cleanly when the job is told to: SIGTERM (schedulers, `kill`) or SIGINT (Ctrl-C).

The first signal only sets a flag; the loop finishes the optimizer step it is in, `train()` writes
a checkpoint and returns, and the process exits with 128 + the signal number (130 for SIGINT, 143
for SIGTERM), the shell's convention, so a job script can tell "stopped early, resumable" from
"finished" (0). A second signal stops at once, with the same exit code; a checkpoint being written
then is left as a temporary directory that the next run ignores and removes.

The one `Preemption` object is created by the caller and passed down; nothing else is global.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import torch

from bigbatch.parallel.process_group import DistInfo, all_reduce_sum

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    def __init__(self) -> None:
        self.signal: int | None = None  # the first signal received, if any

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + self.signal if self.signal is not None else 0

    def request(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler: the first call asks the loop to stop, a second stops at once."""
        if self.signal is not None:
            raise SystemExit(128 + signum)
        self.signal = signum

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[Preemption]:
        """Route SIGTERM/SIGINT to `request` inside the block; restore the old handlers after.

        Python only lets the main thread install handlers; elsewhere (a thread calling train())
        the block runs with the process's handlers unchanged.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self.request) for signum in HANDLED}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def any_rank(flag: bool, dist: DistInfo, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any: a signal or a clock may reach one rank
    first, and all ranks must stop (or save) at the same step. One scalar all-reduce per call
    under torch.distributed, a host sync, so it is made once per optimizer step."""
    if not dist.enabled:
        return flag
    votes = all_reduce_sum(torch.tensor(float(flag), device=device), dist)
    return bool(votes > 0)
