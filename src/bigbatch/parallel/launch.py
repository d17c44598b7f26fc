"""`bigbatch train|verify --nproc N`: start torchrun on this node and run the same subcommand.

A convenience for one machine only; for several, run torchrun yourself (README, "Many machines").
`--standalone` makes torchrun pick a free port and rendezvous on localhost.
"""

from __future__ import annotations

import os
import subprocess
import sys


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


def relaunch(subcommand: str, args: list[str], nproc: int) -> int:
    """Run torchrun in the foreground; its exit code is ours (Ctrl-C reaches it too)."""
    return subprocess.call(torchrun_command(subcommand, args, nproc))


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
