"""One run at a time in a run directory (run/run_lock.py): a second run or resume started into an
`--out` in use is refused in one line naming the holder's pid, so metrics.jsonl never gets two
runs' rows; the lock dies with its process, so a SIGKILLed run's directory resumes at once.

Slow: each test starts two training processes (tests/README.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bigbatch.run.checkpoint_files import list_checkpoints
from small_runs import cli_command, small_args

LOCK_LINE = "is in use by another bigbatch run (pid {pid})"


def start(tiny_overrides: list[str], out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(cli_command("train", *small_args(tiny_overrides, *extra),
                                        "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.mark.parametrize("resume", [[], ["--resume", "auto"]], ids=["fresh", "resume-auto"])
def test_two_runs_into_one_out_one_is_refused_naming_the_other(tiny_overrides, tmp_path, resume):
    out = tmp_path / "run"
    longer = ["--train.max_steps=30", "--train.eval_every=10", *resume]
    first = start(tiny_overrides, out, *longer)
    time.sleep(0.5)  # a moment apart: either may take the lock first
    second = start(tiny_overrides, out, *longer)
    runs = [first, second]
    done = [(run, *run.communicate(timeout=300)) for run in runs]

    refused = [(run, err) for run, _, err in done if run.returncode != 0]
    assert len(refused) == 1, [(run.returncode, err[-500:]) for run, _, err in done]
    loser, err = refused[0]
    winner = first if loser is second else second
    assert loser.returncode == 2 and winner.returncode == 0
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert LOCK_LINE.format(pid=winner.pid) in err
    steps = steps_logged(out)
    assert steps == list(range(1, 31))  # one run's rows, each step once


def test_a_sigkilled_runs_directory_resumes_at_once(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    args = ["--train.max_steps=400", "--train.eval_every=100", "--checkpoint.every_steps=5"]
    killed = start(tiny_overrides, out, *args)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list_checkpoints(out / "checkpoints"), "no checkpoint was written in time"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (out / ".bigbatch.lock").read_text().strip() == str(killed.pid)  # left behind

    resumed = start(tiny_overrides, out, *args, "--resume", "auto")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-2000:]
    assert "resumed from" in stdout and "in use" not in stderr
    assert steps_logged(out) == list(range(1, 401))
