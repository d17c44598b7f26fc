"""`--nproc 2` keeps one process's promise for bad input: one line on stderr, the same line one
process prints, exit code 2, no traceback. And a real crash is one line too, naming the log that
holds the traceback and torchrun's report.

Bad input the launcher can see (a recipe, `--resume PATH`, `--out` holding a run) is refused
before torchrun starts: no torchrun.log is written. Bad input only a rank sees (a missing data
file, a missing Hugging Face directory) goes through torchrun: the log holds torchrun's report,
the terminal only the line. The crash is a third-party library failing on rank 0 (a stand-in
`wandb` whose `init` raises, found first on PYTHONPATH), and a worker SIGKILLed mid-run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from bigbatch.cli import main
from bigbatch.parallel.launch import child_pids
from small_runs import ROOT, cli_command, small_args

TIMEOUT = 240  # seconds any one launch may take here before it counts as hung


def one_process_line(argv: list[str], capsys) -> str:
    """What `bigbatch ARGV` prints in one process (in-process, as tests/unit/cli does)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err


def nproc_2(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*argv, "--nproc", "2"), cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)


def assert_one_line(done: subprocess.CompletedProcess, line: str) -> None:
    assert (done.returncode, done.stderr) == (2, line), done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def error_lines(stderr: str) -> list[str]:
    """The error lines among the workers' own stderr (data preparation's progress, warnings)."""
    return [line for line in stderr.splitlines() if line.startswith("bigbatch: error:")]


@pytest.mark.parametrize("bad", ["data", "hf"])
def test_bad_input_a_rank_finds_is_one_line_and_exit_2(bad, tmp_path, tiny_overrides, capsys):
    """Both ranks refuse the input: the launcher prints the line once; torchrun's report
    (ChildFailedError, its banner) is in the run directory's torchrun.log, not on the terminal."""
    extra = {"data": f"--data.path={tmp_path / 'missing.txt'}",
             "hf": f"--model.source=hf:{tmp_path / 'no-model'}"}[bad]
    args = ["train", *small_args(tiny_overrides, extra)]
    line = one_process_line([*args, "--out", str(tmp_path / "one")], capsys)
    assert ("missing.txt" if bad == "data" else "no-model") in line
    out = tmp_path / "two"
    assert_one_line(nproc_2([*args, "--out", str(out)]), line)
    log = (out / "torchrun.log").read_text()
    assert "ChildFailedError" in log and "OMP_NUM_THREADS" in log


@pytest.mark.parametrize("bad", ["resume", "out", "recipe"])
def test_bad_input_the_launcher_sees_is_refused_before_torchrun(bad, tmp_path, tiny_overrides,
                                                                capsys):
    """A `--resume` path that does not exist, an `--out` holding another run, an unknown config
    key (verify): the same line as one process, and torchrun never starts (no torchrun.log)."""
    out = tmp_path / "run"
    if bad == "out":
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
    argv = {"resume": ["train", *small_args(tiny_overrides), "--out", str(out),
                       "--resume", str(tmp_path / "no-such-run")],
            "out": ["train", *small_args(tiny_overrides), "--out", str(out)],
            "recipe": ["verify", *small_args(tiny_overrides), "--model.n_layers=2"]}[bad]
    line = one_process_line(argv, capsys)
    started = time.perf_counter()
    assert_one_line(nproc_2(argv), line)
    assert not (out / "torchrun.log").exists()
    assert time.perf_counter() - started < 30  # no torchrun, no torch import: ~1 s here


@pytest.fixture
def failing_wandb(tmp_path) -> dict[str, str]:
    """An environment in which `import wandb` finds a stand-in whose `init` raises."""
    package = tmp_path / "stand-ins" / "wandb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "class Settings:\n    def __init__(self, **kwargs):\n        pass\n\n\n"
        "def init(**kwargs):\n    raise RuntimeError('the W&B stand-in refuses to start')\n")
    path = os.pathsep.join(filter(None, [str(package.parent), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline"}


def test_a_crash_on_a_rank_is_one_line_naming_the_log(tmp_path, tiny_overrides, failing_wandb):
    """Rank 0's tracker library raises (not a UsageError): exit 1, the start-up lines still on
    stdout, and on stderr one line naming the rank, the exception and the log; the log holds
    the worker's traceback and torchrun's report."""
    out = tmp_path / "run"
    done = nproc_2(["train", *small_args(tiny_overrides, "--train.trackers=wandb"),
                    "--out", str(out)], env=failing_wandb)
    log = out / "torchrun.log"
    assert done.returncode == 1, done.stderr
    assert error_lines(done.stderr) == [
        "bigbatch: error: rank 0 failed: RuntimeError: the W&B stand-in refuses to start; "
        f"the traceback and torchrun's report are in {log}"]
    assert "model: GPT" in done.stdout and "Traceback" not in done.stdout + done.stderr
    text = log.read_text()
    assert "rank 0's traceback:\nTraceback" in text and "wandb.init(" in text
    assert "ChildFailedError" in text


def rank_of(pid: int) -> str | None:
    """torchrun's RANK in the environment of process `pid`."""
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(pair.decode(errors="replace").partition("=")[::2] for pair in pairs if pair)
    return env.get("RANK")


def test_a_killed_worker_is_one_line_naming_the_log(tmp_path, tiny_overrides):
    """Rank 1 SIGKILLed mid-run (no traceback of its own): the launcher exits non-zero with one
    error line naming rank 1 and the log, which holds torchrun's report of the SIGKILL. Rank 0's
    own failure (its collective's peer is gone) is only in the log."""
    out, log = tmp_path / "run", tmp_path / "run" / "torchrun.log"
    args = [*small_args(tiny_overrides, "--train.max_steps=500"), "--out", str(out)]
    run = subprocess.Popen(cli_command("train", *args, "--nproc", "2"),
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in run.stdout:  # rank 0's start-up lines: both ranks are past rendezvous
            if line.startswith("precision:"):
                break
        (torchrun,) = child_pids(run.pid)
        (rank_1,) = [pid for pid in child_pids(torchrun) if rank_of(pid) == "1"]
        os.kill(rank_1, signal.SIGKILL)
        _, err = run.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            run.kill()
    assert run.returncode not in (0, 2), err
    assert error_lines(err) == [f"bigbatch: error: rank 1 died of SIGKILL; the other ranks' "
                                f"tracebacks and torchrun's report are in {log}"], err
    assert "Traceback" not in err
    assert "SIGKILL" in log.read_text()
