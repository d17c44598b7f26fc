"""The README's commands stay true: it opens with the two set-up commands, and every `bigbatch`
command line it shows parses (recipes exist, overrides name real keys with valid values)."""

from __future__ import annotations

import re
import shlex

import pytest

from bigbatch.cli import RECIPE_PARSERS, main, parse_recipe_args
from bigbatch.config_files import load_config
from conftest import ROOT

README = (ROOT / "README.md").read_text()


def code_lines() -> list[str]:
    blocks = re.findall(r"```(?:sh)?\n(.*?)```", README, flags=re.S)
    return [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]


def test_readme_opens_with_the_two_setup_commands():
    first_block = re.search(r"```(?:sh)?\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert commands == ["make train", "make test"]
    assert README.index("make train") < 300


RECIPE_COMMANDS = [line for line in code_lines()
                   if re.match(r"bigbatch (train|verify|config|plan)\b", line)]


def test_readme_shows_recipe_commands():
    assert len(RECIPE_COMMANDS) >= 4


@pytest.mark.parametrize("line", RECIPE_COMMANDS)
def test_readme_command_parses(line, monkeypatch):
    """Resolve each shown command's recipe and overrides exactly as the CLI would."""
    monkeypatch.chdir(ROOT)
    command, *args = shlex.split(line)[1:]
    opts, overrides = parse_recipe_args(RECIPE_PARSERS[command](), args)
    load_config(opts.recipe, overrides)


def test_config_fields_lists_every_key(capsys):
    assert main(["config", "--fields"]) == 0
    out = capsys.readouterr().out
    for key in ("data.path", "data.seq_len", "batch.global_tokens", "batch.micro_batch_size",
                "optim.clip_value", "precision.dtype", "train.eval_every"):
        assert key in out

