"""Signals and crashes: SIGTERM mid-run, SIGKILL mid-save, and a second signal, in real processes.

Each killed run is resumed in-process and must then match an uninterrupted run bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from bigbatch.run.checkpoint_files import list_checkpoints, verify_checkpoint
from bigbatch.run.preemption import Preemption
from bigbatch.run.train import train
from small_runs import ROOT, metric_rows, small_args, small_config

# Runs the CLI with checkpoint_files._fsync slowed down: once a file of a checkpoint whose name starts
# with argv[1] is written, it says so and hangs, so the test can signal or kill it mid-save.
HANG_MID_SAVE = """
import sys, time
from bigbatch.run import checkpoint_files
from bigbatch.cli import main
real_fsync = checkpoint_files._fsync
def fsync_then_hang(path):
    real_fsync(path)
    if path.parent.name.startswith(".tmp-" + sys.argv[1]):
        print("saving " + path.parent.name, flush=True)
        time.sleep(300)
checkpoint_files._fsync = fsync_then_hang
sys.exit(main(sys.argv[2:]))
"""


class Process:
    """A `bigbatch train` subprocess whose merged output is read line by line."""

    def __init__(self, args: list[str], hang_at: str | None = None, timeout: float = 240) -> None:
        prefix = [sys.executable, "-c", HANG_MID_SAVE, hang_at] if hang_at else \
            [sys.executable, "-m", "bigbatch"]
        self.proc = subprocess.Popen([*prefix, "train", *args], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.watchdog = threading.Timer(timeout, self.proc.kill)  # never hang the test suite
        self.watchdog.start()

    def wait_for(self, text: str) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if text in line:
                return
        pytest.fail(f"the run ended without printing {text!r}:\n{self.output}")

    def finish(self) -> int:
        self.lines.extend(self.proc.stdout)
        code = self.proc.wait()
        self.watchdog.cancel()
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_overrides):
    """The reference: 6 steps without interruption or checkpoints."""
    return train(small_config(tiny_overrides), tmp_path_factory.mktemp("straight"),
                 verbose=False).out_dir


def assert_same_run(run_dir, reference) -> None:
    assert metric_rows(run_dir) == metric_rows(reference)
    assert ((run_dir / "model.safetensors").read_bytes()
            == (reference / "model.safetensors").read_bytes())


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(tmp_path, tiny_overrides, straight):
    out = tmp_path / "run"
    run = Process([*small_args(tiny_overrides), "--out", str(out)])
    run.wait_for("step 1/6")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.output
    saved = list_checkpoints(out / "checkpoints")
    assert len(saved) == 1 and verify_checkpoint(saved[0]) is None, run.output
    assert f"stopped by SIGTERM after step {int(saved[0].name[5:])}/6" in run.output
    assert f"checkpoint {saved[0]}" in run.output
    assert f"--resume auto --out {out}" in run.output
    assert "(stopped by SIGTERM)" in (out / "report.html").read_text()  # the run report

    assert train(small_config(tiny_overrides), out, verbose=False, resume="auto").exit_code == 0
    assert_same_run(out, straight)
    report = (out / "report.html").read_text()
    assert "finished: 6 of 6 steps" in report and "over 2 sessions (resumed)" in report


def test_sigkill_mid_save_resumes_from_the_previous_checkpoint(tmp_path, tiny_overrides,
                                                               straight):
    out = tmp_path / "run"
    run = Process([*small_args(tiny_overrides, "--checkpoint.every_steps=2"), "--out", str(out)],
                  hang_at="step-00000004")
    run.wait_for("saving .tmp-step-00000004")
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    partial = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert len(partial) == 1  # what the kill left behind

    cfg = small_config(tiny_overrides, "--checkpoint.every_steps=2")
    assert train(cfg, out, verbose=False, resume="auto").state.step == 6
    assert_same_run(out, straight)  # also: metrics rows of steps 3-4 were not logged twice
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000004", "step-00000006"]  # the partial save removed, keep = 2


def test_a_second_signal_stops_at_once(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    run = Process([*small_args(tiny_overrides), "--out", str(out)], hang_at="step-")
    run.wait_for("step 1/6")
    run.proc.send_signal(signal.SIGTERM)
    run.wait_for("saving .tmp-step-")  # the stop's checkpoint has begun (and hangs)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 128 + signal.SIGINT, run.output
    assert "stopped by" not in run.output
    assert list_checkpoints(out / "checkpoints") == []


def test_handlers_are_installed_only_inside_the_block():
    preemption = Preemption()
    before = signal.getsignal(signal.SIGINT)
    with preemption.handling_signals():
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only a request
        assert preemption.requested and preemption.exit_code == 130
        with pytest.raises(SystemExit) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is before
