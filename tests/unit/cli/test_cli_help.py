"""Every subcommand answers --help and -h with its own usage, one line per flag, an example, and
(for recipe-taking commands) where to find every config field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bigbatch.cli import COMMANDS, RECIPE_PARSERS, main
from conftest import ROOT


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_subcommand_answers_help(command, flag, capsys):
    assert main([command, flag]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out
    assert out.startswith(f"usage: bigbatch {command}")
    assert "examples:\n  bigbatch " + command in out
    parser = (RECIPE_PARSERS.get(command) or (lambda: None))()
    if parser is not None:
        assert "bigbatch config --fields" in out
        for action in parser._actions:  # every flag is listed with its own help line
            assert action.help, action.option_strings
            for option in action.option_strings:
                assert option in out


def test_help_through_the_installed_command():
    """The real console entry point: exit 0, usage on stdout, nothing on stderr."""
    done = subprocess.run([sys.executable, "-m", "bigbatch", "train", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert "--resume auto|PATH" in done.stdout and "--overwrite" in done.stdout


def test_overrides_with_spaces_are_not_taken_for_the_recipe(capsys):
    """`--data.seq_len 64` keeps its value; the recipe is the one positional left."""
    assert main(["config", "--data.seq_len", "64", "--batch.global_tokens=4096",
                 "--batch.micro_batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "seq_len = 64" in out and "micro_batch_size = 4" in out
