"""One run at a time in a run directory: an advisory lock on `--out/.bigbatch.lock`.

The lock is `fcntl.flock` on that file, held for the run's life by the process that writes the
directory (rank 0 under torchrun) and released by the kernel when that process ends, however it
ends: a SIGKILLed run never blocks its own `--resume auto`. The holder writes its pid into the
file, so a second run or resume into the same directory is refused in one line naming it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from bigbatch.errors import UsageError

LOCK_NAME = ".bigbatch.lock"

try:
    import fcntl
except ImportError:  # not POSIX: no lock, as on a file system without flock below
    fcntl = None


class RunLock:
    """`acquire()` takes the lock on `out_dir` (refusing when another process holds it);
    `release()` lets it go (idempotent; the kernel does it too when the process ends)."""

    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None or self.fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                return  # a file system without flock (some network ones): run unlocked
            raise UsageError(f"--out {str(self.path.parent)!r} is in use by another bigbatch "
                             f"run ({self.holder()}): wait for it to end, stop it, or choose "
                             "another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "pid not yet written"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None
