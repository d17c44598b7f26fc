"""Extending a warmup-stable-decay run (run/extend.py): `--resume auto --train.max_steps=M` on
a run planned for N < M steps.

Invariants:
- the extension continues from the run's last checkpoint before the cooldown (kept whatever
  checkpoint.keep says) and equals a run planned for M steps from the start, bit for bit:
  every metrics.jsonl row (loss, lr, grad_norm, val_loss per step) and the final weights;
- where it cannot (a decay other than wsd, no checkpoint before the cooldown, other settings
  changed too) it is one line on stderr, exit code 2, naming the value and what would work,
  and the run's checkpoints are left as they were.
"""

from __future__ import annotations

import subprocess

from bigbatch.run.checkpoint_files import list_checkpoints
from bigbatch.run.train import train
from small_runs import ROOT, StopAfter, cli_command, metric_rows, small_args, small_config

# T = 6: the cooldown is the steps past 6 - 1 - 0.2 x 6 = 3.8 (0-based): steps 5 and 6, so step 4
# is the last before it. T = 10: past step 7 (0-based): steps 9 and 10.
WSD = ["--optim.decay=wsd", "--optim.cooldown_fraction=0.2"]
SAVING = ["--checkpoint.every_steps=3", "--checkpoint.keep=1"]


def names(run_dir) -> list[str]:
    return [p.name for p in list_checkpoints(run_dir / "checkpoints")]


def test_an_extended_run_equals_the_longer_run_planned_from_the_start(tmp_path, tiny_overrides,
                                                                      capsys):
    planned = train(small_config(tiny_overrides, *WSD, "--train.max_steps=10"),
                    tmp_path / "planned", verbose=False)
    run_dir = tmp_path / "extended"
    short = train(small_config(tiny_overrides, *WSD, *SAVING, "--train.max_steps=6"), run_dir,
                  verbose=False)
    assert short.state.step == 6
    # step-3 (every 3 steps) went for keep = 1; step-4, the last before the cooldown, stays.
    assert names(run_dir) == ["step-00000004", "step-00000006"]

    capsys.readouterr()
    longer = train(small_config(tiny_overrides, *WSD, *SAVING, "--train.max_steps=10"), run_dir,
                   resume="auto")
    said = capsys.readouterr().out
    assert (f"resume: extending the run from 6 to 10 steps from {run_dir / 'checkpoints'}"
            f"/step-00000004 (the last before the cooldown)") in said
    assert longer.state.step == 10
    assert longer.state.tokens_seen == planned.state.tokens_seen
    rows = metric_rows(run_dir)
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 10]
    assert rows == metric_rows(planned.out_dir)
    assert ((run_dir / "model.safetensors").read_bytes()
            == (planned.out_dir / "model.safetensors").read_bytes())
    # The extended run keeps its own last checkpoint before its (moved) cooldown, step 8, and
    # step 9 (every 3 steps; step 6 went for keep = 1).
    assert names(run_dir) == ["step-00000008", "step-00000009"]


def refused(tiny_overrides, run_dir, *extra: str) -> str:
    """Extend `run_dir` to 10 steps through the command line: the one stderr line."""
    before = names(run_dir)
    done = subprocess.run(cli_command("train", *small_args(tiny_overrides, *extra),
                                      "--train.max_steps=10", "--out", str(run_dir),
                                      "--resume", "auto"),
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert names(run_dir) == before  # nothing removed
    return done.stderr


def test_extensions_that_cannot_be_exact_are_refused_in_one_line(tmp_path, tiny_overrides):
    cosine = tmp_path / "cosine"
    train(small_config(tiny_overrides, "--optim.decay=cosine", *SAVING), cosine, verbose=False)
    line = refused(tiny_overrides, cosine, "--optim.decay=cosine", *SAVING)
    assert "--train.max_steps=10" in line and "optim.decay = 'cosine'" in line
    assert "--train.max_steps=6" in line and 'optim.decay = "wsd"' in line

    # Checkpointing only by the stop, inside the cooldown (step 5): nothing to extend from.
    stopped = tmp_path / "stopped"
    train(small_config(tiny_overrides, *WSD), stopped, verbose=False, preemption=StopAfter(5))
    assert names(stopped) == ["step-00000005"]
    line = refused(tiny_overrides, stopped, *WSD)
    assert f"{stopped / 'checkpoints' / 'step-00000005'}" in line
    assert "inside the cooldown" in line and "no checkpoint before the cooldown" in line
    assert "--train.max_steps=6" in line

    changed = tmp_path / "changed"
    train(small_config(tiny_overrides, *WSD, *SAVING), changed, verbose=False)
    line = refused(tiny_overrides, changed, *WSD, *SAVING, "--optim.lr=0.002")
    assert "other settings changed too" in line and "optim.lr: 0.003 -> 0.002" in line
    assert "change only train.max_steps" in line
