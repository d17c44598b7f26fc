"""`bigbatch train|verify --nproc N`: start torchrun on this node and run the same subcommand.

A convenience for one machine only; for several, run torchrun yourself (README, "Several
processes and machines"). `--standalone` makes torchrun pick a free port and rendezvous on
localhost.

Signals: SIGTERM/SIGINT to this process are passed on to torchrun, once, and torchrun passes
them on to each worker, which finishes its step, writes the stop checkpoint and exits 128 +
signal. torchrun gives the workers `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds (its own default,
30, is raised to `SHUTDOWN_GRACE_SECONDS` here: a step plus a checkpoint of a large model can
take longer) before it SIGKILLs them, and then exits 1, whatever the workers said; this process
exits 128 + signal instead, the code one process gives. torchrun runs in a session of its own,
so a terminal's Ctrl-C reaches it only through here and the workers get one signal, not two. A
second signal goes straight to the workers, which then stop at once (preemption.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

HANDLED = (signal.SIGTERM, signal.SIGINT)  # as preemption.py's (not imported: it loads torch)
SHUTDOWN_GRACE_SECONDS = 300
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


def without_flag(args: list[str], flag: str) -> list[str]:
    """`args` minus `flag VALUE` / `flag=VALUE`."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            kept.append(arg)
    return kept


def torchrun_command(subcommand: str, args: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "bigbatch", subcommand,
            *without_flag(args, "--nproc")]


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def _term_when_parent_dies() -> None:
    """In torchrun's process before exec: if this launcher is killed (SIGKILL, a lost shell),
    torchrun gets SIGTERM and stops its workers with a checkpoint instead of running on."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SignalForwarder:
    """The launcher's SIGTERM/SIGINT handler: the first signal to torchrun, later ones to the
    workers themselves."""

    def __init__(self, torchrun: subprocess.Popen) -> None:
        self.torchrun = torchrun
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object = None) -> None:
        if self.signal is None:
            self.signal = signum
            with contextlib.suppress(ProcessLookupError):
                self.torchrun.send_signal(signum)
            return
        # A second signal to torchrun would abort its wait for the workers and leave them
        # running; sent to the workers it is their "second signal": stop at once.
        for pid in child_pids(self.torchrun.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def relaunch(subcommand: str, args: list[str], nproc: int) -> int:
    """Run torchrun and wait for it, passing SIGTERM/SIGINT on (module docstring). Returns
    torchrun's exit code, or 128 + signal when a signal stopped the run."""
    env = dict(os.environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE_SECONDS))
    torchrun = subprocess.Popen(torchrun_command(subcommand, args, nproc), env=env,
                                start_new_session=True, preexec_fn=_term_when_parent_dies)
    forwarder = SignalForwarder(torchrun)
    previous = {signum: signal.signal(signum, forwarder) for signum in HANDLED}
    try:
        code = torchrun.wait()  # bounded: torchrun SIGKILLs workers after its grace period
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if forwarder.signal is not None and code != 0:
        return 128 + forwarder.signal
    return code


def exit_process(code: int) -> None:
    """Leave with `code`. A torchrun rank skips the C++ teardown at interpreter exit: there FSDP2
    on gloo sometimes aborts after all work is done ("terminate called without an active
    exception": 1 run in 8 of a bare fully_shard script here, 0 in 12 with os._exit), which
    torchrun would report as a failed run. The process group is already destroyed by then."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
