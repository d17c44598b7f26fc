"""The README's commands stay true: it opens with the two set-up commands, and every `bigbatch`
command line it shows parses (recipes exist, overrides name real keys with valid values)."""

from __future__ import annotations

import re
import shlex

import pytest

from bigbatch.cli import RECIPE_PARSERS, main, parse_recipe_args
from bigbatch.config.files import load_config
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



def python_examples() -> list[str]:
    section = README.split("## From Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_has_the_two_python_examples():
    examples = python_examples()
    assert len(examples) == 2
    assert "bigbatch.train_step" in examples[0] and "GPT2LMHeadModel" in examples[0]
    assert "bigbatch.train(" in examples[1]


# The notebook example is a whole run (bigbatch.train, 8 steps): slow. The own-loop one: 5 steps.
@pytest.mark.parametrize("index", [0, pytest.param(1, marks=pytest.mark.slow)],
                         ids=["own-loop", "notebook"])
def test_readme_python_example_runs(index, tmp_path, monkeypatch, capsys, cache_dir):
    """Each example runs as written, from the repository root (the notebook's run directory and
    token cache go to temporary folders); what it prints is checked, and its own asserts hold."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(ROOT)
    code = python_examples()[index]
    if index == 1:
        code = code.replace('"runs/notebook"', repr(str(tmp_path / "notebook")))
        code = code.replace('"train.eval_tokens": 8192}',
                            f'"train.eval_tokens": 8192, "data.cache_dir": {str(cache_dir)!r}}}')
    exec(compile(code, f"README example {index}", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    if index == 0:
        losses = [float(m) for m in re.findall(r"step \d: loss ([\d.]+)", out)]
        assert len(losses) == 5 and losses[-1] < losses[0] - 0.1
        assert "accumulation error" in out
    else:
        assert "8 steps, validation loss" in out
        assert (tmp_path / "notebook" / "model.safetensors").is_file()
