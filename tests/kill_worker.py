"""torchrun's entry point in the restart tests: `bigbatch train ARGS`, except that on torchrun's
first attempt (TORCHELASTIC_RESTART_COUNT = 0) the worker of rank KILL_RANK SIGKILLs itself just
before step KILL_AT_STEP's forward and backward, as a lost node or an OOM kill would end it: no
handler runs, nothing is flushed, its peers are left waiting in the step's all-reduce.

    torchrun ... --max-restarts 1 tests/kill_worker.py train RECIPE --resume auto ...
"""

from __future__ import annotations

import os
import signal
import sys

from bigbatch.cli import main
from bigbatch.engine import loop
from bigbatch.parallel.launch import exit_process


def die_before_step(step: int) -> None:
    real_train_step, calls = loop.train_step, []

    def train_step_or_die(*args, **kwargs):
        calls.append(None)
        if len(calls) == step:
            print(f"rank {os.environ['RANK']}: SIGKILL before step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_train_step(*args, **kwargs)

    loop.train_step = train_step_or_die  # fit() looks train_step up in its module per call


if __name__ == "__main__":
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
            and os.environ["RANK"] == os.environ["KILL_RANK"]):
        die_before_step(int(os.environ["KILL_AT_STEP"]))
    exit_process(main(sys.argv[1:]))
