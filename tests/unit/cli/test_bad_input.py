"""Bad input: one line on stderr naming what is wrong, exit code 2, no traceback (--debug shows it).

Every case is one row of TABLE, run in-process through `bigbatch.cli.main`; a subprocess test
checks the traceback switch, and a property test throws random TOML and overrides at `config`.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import string
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigbatch.cli import main
from bigbatch.config.files import field_docs
from bigbatch.config.sections import SECTIONS
from bigbatch.run import checkpoint
from bigbatch.run.checkpoint_files import list_checkpoints, verify_checkpoint
from bigbatch.run.train import train
from small_runs import ROOT, cli_command, small_args, small_config


@dataclass
class Ctx:
    tmp: Path
    tiny: list[str]           # data path and cache overrides
    finished: Path            # a run directory holding checkpoints step-1 and step-2

    def train(self, *extra: str, out: str = "out") -> list[str]:
        return ["train", *small_args(self.tiny, *extra), "--out", str(self.tmp / out)]


@dataclass
class Case:
    id: str
    argv: Callable[[Ctx], list[str]]
    fragment: str
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    check: Callable[[Ctx], None] | None = None


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def disk_full_on_third_safetensors_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two safetensors files per checkpoint: the third write is step 2's model."""
    calls = []
    real = checkpoint.save_file

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def only_step_1_survives(ctx: Ctx) -> None:
    saved = list_checkpoints(ctx.tmp / "full" / "checkpoints")
    assert [p.name for p in saved] == ["step-00000001"] and verify_checkpoint(saved[0]) is None
    assert [p.name for p in (ctx.tmp / "full" / "checkpoints").iterdir()] == ["step-00000001"]


TABLE = [
    Case("recipe-missing", lambda c: ["train", str(c.tmp / "nope.toml")], "is not a file"),
    Case("malformed-toml", lambda c: ["train", str(write(c.tmp / "bad.toml", "[data\nseq_len ="))],
         "is not valid TOML"),
    Case("unknown-key", lambda c: c.train("--data.nope=1"), "unknown config key data.nope"),
    Case("unknown-section", lambda c: c.train("--nosuch.key=1"), "unknown config section"),
    Case("mistyped-key", lambda c: c.train("--data.seq_len=abc"),
         "data.seq_len = 'abc' has the wrong type"),
    Case("zero-micro-batch", lambda c: c.train("--batch.micro_batch_size=0"),
         "batch.micro_batch_size = 0"),
    Case("negative-seq-len", lambda c: c.train("--data.seq_len=-64"), "data.seq_len = -64"),
    Case("zero-keep", lambda c: c.train("--checkpoint.keep=0"), "checkpoint.keep = 0"),
    Case("indivisible-batch", lambda c: c.train("--batch.global_tokens=2000"),
         "not a whole number of micro-steps"),
    Case("packing-off-for-lm", lambda c: c.train("--data.packing=false"),
         "data.packing = false is for train.task = 'sft'"),
    Case("micro-batch-too-large", lambda c: c.train("--batch.micro_batch_size=64"),
         "larger than the per-rank batch"),
    Case("tracker-unknown", lambda c: c.train('--train.trackers=["comet"]'),
         "train.trackers = ['comet'] is invalid: a list of names from"),
    Case("tracker-not-a-list", lambda c: c.train("--train.trackers=3"),
         "train.trackers = 3 has the wrong type: expected a list of strings"),
    # A library missing (None in sys.modules makes its import fail): said before anything runs.
    Case("wandb-not-installed", lambda c: c.train("--train.trackers=wandb", out="no-wandb"),
         "pip install 'bigbatch[wandb]'", patch=lambda mp: mp.setitem(sys.modules, "wandb", None),
         check=lambda c: not (c.tmp / "no-wandb").exists() or pytest.fail("a run started")),
    Case("mlflow-not-installed", lambda c: c.train("--train.trackers=mlflow", out="no-mlflow"),
         "pip install 'bigbatch[mlflow]'", patch=lambda mp: mp.setitem(sys.modules, "mlflow", None),
         check=lambda c: not (c.tmp / "no-mlflow").exists() or pytest.fail("a run started")),
    Case("unexpected-argument", lambda c: [*c.train(), "--bogus"], "unexpected argument '--bogus'"),
    Case("resume-without-value", lambda c: [*c.train(), "--resume"], "--resume needs a value"),
    Case("data-path-missing", lambda c: c.train(f"--data.path={c.tmp / 'missing.txt'}"),
         "does not exist"),
    Case("data-file-empty", lambda c: c.train(f"--data.path={write(c.tmp / 'empty.txt', '')}"),
         "holds no readable text"),
    Case("data-dir-empty", lambda c: c.train(f"--data.path={folder(c.tmp / 'empty-dir')}"),
         "holds no files matching"),
    Case("corpus-shorter-than-a-sequence",  # two documents: one to train on, one to validate
         lambda c: c.train(f"--data.path={write(c.tmp / 'short/a.txt', 'to be').parent}",
                           f"--data.path={write(c.tmp / 'short/b.txt', 'or not').parent}"),
         "holds 0 sequences"),
    Case("not-a-tokenizer-dir",
         lambda c: c.train(f"--data.tokenizer={write(c.tmp / 'tok/README', 'no').parent}"),
         "is not a tokenizer directory"),
    Case("out-holds-another-runs-checkpoints",
         lambda c: ["train", *small_args(c.tiny), "--out", str(c.finished)],
         "already holds a run (checkpoints/ (newest step-00000002)"),
    Case("incompatible-checkpoint",
         lambda c: c.train("--model.d_model=64", "--resume",
                           str(c.finished / "checkpoints" / "step-00000002")),
         "incompatible model (d_model: 32 -> 64)"),
    Case("resume-from-nothing", lambda c: c.train("--resume", str(c.tmp / "nowhere")),
         "is neither a checkpoint directory nor a run directory"),
    Case("unwritable-out", lambda c: c.train(out=f"{write(c.tmp / 'a-file', '').name}/run"),
         "is not writable"),
    Case("disk-full-while-saving",
         lambda c: c.train("--checkpoint.every_steps=1", "--train.max_steps=3", out="full"),
         "No space left on device", patch=disk_full_on_third_safetensors_file,
         check=only_step_1_survives),
    Case("cbs-not-a-run-dir", lambda c: ["cbs", str(c.tmp / "nowhere")], "is not a run directory"),
    Case("cbs-dir-without-metrics", lambda c: ["cbs", str(folder(c.tmp / "no-metrics"))],
         "is not a run directory (no metrics.jsonl)"),
    Case("cbs-no-checkpoints",
         lambda c: ["cbs", str(write(c.tmp / "no-checkpoints/metrics.jsonl", "").parent)],
         "holds 0 intact checkpoint(s); cbs branches from 2 or more: train the run with "
         "--checkpoint.every_steps="),
    Case("cbs-bad-factors", lambda c: ["cbs", str(c.finished), "--factors", "0,2"],
         "--factors '0,2' must list 2 or more positive multiples"),
    Case("cbs-factor-not-whole-sequences", lambda c: ["cbs", str(c.finished), "--factors", "0.3,1"],
         "0.3 x the run's batch of 2,048 tokens is not a whole number of 64-token sequences"),
    Case("cbs-bad-branch-tokens", lambda c: ["cbs", str(c.finished), "--branch-tokens", "0"],
         "--branch-tokens = '0' must be a positive integer"),
    Case("cbs-bad-override", lambda c: ["cbs", str(c.finished), "--optim.lr_scaling=cubic"],
         "optim.lr_scaling = 'cubic'",
         check=lambda c: not (c.finished / "cbs-branches").exists() or pytest.fail("branched")),
    Case("plan-from-not-a-run", lambda c: ["plan", "--from", str(folder(c.tmp / "not-a-run"))],
         "is not a finished run directory"),
]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_overrides) -> Ctx:
    finished = tmp_path_factory.mktemp("finished")
    train(small_config(tiny_overrides, "--train.max_steps=2", "--checkpoint.every_steps=1"),
          finished, verbose=False)
    return Ctx(tmp_path_factory.mktemp("bad"), tiny_overrides, finished)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in TABLE])
def test_bad_input_is_one_line_and_exit_2(case, ctx, monkeypatch, capsys):
    if case.patch:
        case.patch(monkeypatch)
    assert main(case.argv(ctx)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("bigbatch: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert case.fragment in errors[0]
    assert "Traceback" not in err
    if case.check:
        case.check(ctx)


def test_debug_shows_the_traceback(tiny_overrides):
    """Through a real process: without --debug no traceback, with it the UsageError's."""
    args = ["train", *small_args(tiny_overrides, "--data.nope=1")]
    plain = subprocess.run(cli_command(*args), capture_output=True, text=True, cwd=ROOT)
    debug = subprocess.run(cli_command(*args, "--debug"), capture_output=True, text=True,
                           cwd=ROOT)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1
    assert "Traceback" not in plain.stderr and "data.nope" in plain.stderr
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "UsageError: unknown config key data.nope" in debug.stderr


# Random TOML: real section and key names mixed with junk, values of every TOML type.
FIELDS = [key.split(".") for key, _, _ in field_docs()]
NAMES = st.sampled_from(sorted({s for s, _ in FIELDS} | {k for _, k in FIELDS} | {"x", ""}))
SCALARS = (st.integers() | st.floats() | st.booleans() | st.text(max_size=8)
           | st.sampled_from(["auto", "fp16", "cosine", "cpu", "1GiB", "-1"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(NAMES, inner, max_size=3), max_leaves=6)
DOCUMENTS = st.dictionaries(NAMES, st.dictionaries(NAMES, VALUES, max_size=4) | VALUES,
                            max_size=4).map(tomli_w.dumps)
OVERRIDE_TEXT = st.text(alphabet=string.printable, max_size=12)
OVERRIDES = st.lists(
    st.builds(lambda section, key, value: f"--{section}.{key}={value}",
              st.sampled_from(sorted(SECTIONS) + ["x"]), NAMES, OVERRIDE_TEXT)
    | OVERRIDE_TEXT, max_size=4)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=DOCUMENTS | st.text(max_size=40), overrides=OVERRIDES)
def test_random_config_input_never_raises(tmp_path, document, overrides):
    """Whatever the recipe and overrides, `bigbatch config` answers with exit 0 or 2."""
    recipe = tmp_path / "random.toml"
    recipe.write_text(document)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["config", str(recipe), *overrides])
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert err.getvalue().startswith("bigbatch: error:") and err.getvalue().count("\n") == 1
