"""The `bigbatch` command: subcommands only, no training logic.

    bigbatch train  [RECIPE] [--out DIR] [--resume auto|PATH] [--overwrite] [--nproc N]
                    [--section.field=VALUE ...]
    bigbatch config [RECIPE] [--world-size N] [--section.field=VALUE ...]
    bigbatch plan   [RECIPE] [--json] [--world-size N] [--from RUN_DIR] [--section.field=VALUE ...]
    bigbatch verify [RECIPE] [--float64] [--nproc N] [--section.field=VALUE ...]
    bigbatch sample RUN_DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K]
    bigbatch report RUN_DIR [--out FILE.html]
    bigbatch compare RUN_DIR RUN_DIR... [--out FILE.html]
    bigbatch sweep  [RECIPE] --batches A,B,... --target-loss X [--out DIR] [--max-tokens N]
                    [--eval-every-tokens N] [--section.field=VALUE ...]
    bigbatch cbs    RUN_DIR [--factors 1,2,4,8] [--branch-tokens N] [--section.field=VALUE ...]
    bigbatch export RUN_DIR --format hf [--merge] --out DIR
    bigbatch COMMAND --help   (each command's flags and an example)

Bad input is one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from bigbatch.errors import UsageError

USAGE = __doc__.split("\n\n")[1]


class CommandDone(Exception):
    """`--help` was answered: leave with this exit status (0), not with SystemExit."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are bigbatch's one-line UsageError (exit 2), and whose --help
    returns to main() instead of exiting the interpreter (tests call main() in-process)."""

    def __init__(self, name: str, summary: str, examples: list[str], recipe: bool = True):
        epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
        if recipe:
            epilog += ("\n\nany config field: --section.field=VALUE or --section.field VALUE "
                       "(e.g. --optim.lr=1e-3);\nevery field, its default and what it means: "
                       "bigbatch config --fields")
        super().__init__(prog=f"bigbatch {name}", description=summary, epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False)
        if recipe:
            self.add_argument("recipe", nargs="?", default=None,
                              help="a TOML recipe (configs/*.toml); default: configs/default.toml")
        self.add_argument("--debug", action="store_true",
                          help="show the traceback of a one-line error")

    def error(self, message: str):
        missing = re.fullmatch(r"argument (--[\w-]+).*: expected one argument", message)
        raise UsageError(f"{missing.group(1)} needs a value" if missing else message)

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, file=sys.stderr, end="")
        raise CommandDone(status)


def split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(`--section.field=VALUE` overrides, everything else). By hand, because argparse cannot
    take options whose names are not known in advance; a space-separated value
    (`--data.seq_len 128`) goes with its key, so it is never taken for the recipe."""
    overrides, rest = [], []
    i = 0
    while i < len(args):
        name, has_value, _ = args[i].partition("=")
        if name.startswith("--") and "." in name:
            overrides.append(args[i])
            if not has_value and i + 1 < len(args):
                i += 1
                overrides.append(args[i])
        else:
            rest.append(args[i])
        i += 1
    return overrides, rest


def parse_recipe_args(parser: Parser, args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """A recipe-taking subcommand's flags (argparse) and config overrides (by hand)."""
    overrides, rest = split_overrides(args)
    opts, unknown = parser.parse_known_args(rest)
    if unknown:
        flags = sorted(f for f in parser._option_string_actions if f.startswith("--"))
        raise UsageError(f"unexpected argument {unknown[0]!r}: expected a recipe file, "
                         f"--section.field=VALUE overrides, or one of {', '.join(flags)}")
    return opts, overrides


def train_parser() -> Parser:
    parser = Parser("train", "Train a recipe into a run directory.", [
        "bigbatch train                                   # the default recipe",
        "bigbatch train configs/tiny.toml --data.path=../shared/data/tinyshakespeare/input.txt "
        "--out runs/tiny",
        "bigbatch train configs/tiny.toml --out runs/tiny --resume auto",
        "bigbatch train configs/tiny.toml --nproc 2       # torchrun on this machine"])
    parser.add_argument("--out", help="the run directory (default: runs/RECIPE-TIME)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="continue from the newest checkpoint in --out (auto) or from PATH")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous run's outputs in --out instead of refusing")
    parser.add_argument("--nproc", metavar="N", help="run N ranks on this machine (torchrun)")
    return parser


def config_parser() -> Parser:
    parser = Parser("config", "Print the resolved config and the batch arithmetic.", [
        "bigbatch config configs/tiny.toml --world-size 4", "bigbatch config --fields"])
    parser.add_argument("--world-size", metavar="N", default="1",
                        help="ranks to do the batch arithmetic for (default 1)")
    parser.add_argument("--fields", action="store_true",
                        help="list every config field, its default and what it means")
    return parser


def plan_parser() -> Parser:
    parser = Parser("plan", "Choose the micro-batch (and checkpointing, chunked loss) that "
                    "fits batch.memory_budget, and explain the choice.", [
                        "bigbatch plan configs/tiny.toml --batch.memory_budget=2GiB",
                        "bigbatch plan configs/tiny.toml --world-size 8 --json",
                        "bigbatch plan --world-size 4 --from runs/tiny   # do 4 ranks pay?"])
    parser.add_argument("--world-size", metavar="N", default="1", help="ranks (default 1)")
    parser.add_argument("--from", dest="from_run", metavar="RUN_DIR", help="a finished run: "
                        "its config, and whether N ranks pay against its critical batch")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def verify_parser() -> Parser:
    parser = Parser("verify", "Check that accumulated gradients equal one big batch's, on "
                    "the recipe's model and data.", [
                        "bigbatch verify configs/tiny.toml",
                        "bigbatch verify configs/tiny.toml --float64",
                        "bigbatch verify configs/tiny.toml --nproc 2   # + ranks vs one process"])
    parser.add_argument("--float64", action="store_true", help="check in float64 (tighter)")
    parser.add_argument("--nproc", metavar="N", help="also compare N ranks with one process")
    return parser


def sweep_parser() -> Parser:
    parser = Parser("sweep", "Train the recipe at several global batches to a target loss and "
                    "fit the critical batch.", [
                        "bigbatch sweep configs/sweep.toml --batches 128,512,2048,8192 "
                        "--target-loss 3.8"])
    parser.add_argument("--batches", metavar="A,B,...", help="global batches in tokens")
    parser.add_argument("--target-loss", metavar="X", help="validation loss each run trains to")
    parser.add_argument("--out", help="directory of the runs (default: runs/sweep-RECIPE-TIME)")
    parser.add_argument("--max-tokens", metavar="N", help="stop a run after N tokens")
    parser.add_argument("--eval-every-tokens", metavar="N", help="evaluate about every N tokens")
    return parser


def cmd_train(args: list[str]) -> int:
    from bigbatch.config.files import load_config

    opts, overrides = parse_recipe_args(train_parser(), args)
    cfg = load_config(opts.recipe, overrides)
    stem = Path(opts.recipe).stem if opts.recipe else "default"
    out = Path(opts.out or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if opts.nproc is not None:  # every rank must get the same --out, so it is fixed here
        from bigbatch.parallel.launch import relaunch, without_flag
        from bigbatch.run.resume import check_before_launch

        nproc = _positive_int(opts.nproc, "--nproc")
        check_before_launch(out, opts.resume, opts.overwrite)  # before torchrun, not per rank
        return relaunch("train", [*without_flag(args, "--out"), "--out", str(out)], nproc,
                        log_dir=out)
    from bigbatch.run.train import train  # not before: the --nproc launcher never needs torch

    # 128 + the signal number when SIGTERM/SIGINT stopped it early with a checkpoint, else 0.
    return train(cfg, out, resume=opts.resume, overwrite=opts.overwrite).exit_code


def cmd_config(args: list[str]) -> int:
    from bigbatch.config.files import config_to_toml, field_docs, load_config
    from bigbatch.tasks import task_of

    opts, overrides = parse_recipe_args(config_parser(), args)
    if opts.fields:
        for key, default, doc in field_docs():
            print(f"{key} = {default!r}\n    {doc}")
        return 0
    cfg = load_config(opts.recipe, overrides)
    world_size = _positive_int(opts.world_size, "--world-size")
    print(config_to_toml(cfg))
    for line in task_of(cfg).describe_batch(cfg, world_size):
        print(f"# {line}")
    return 0


def cmd_verify(args: list[str]) -> int:
    from bigbatch.config.files import load_config
    from bigbatch.tools.verify import verify_recipe

    opts, overrides = parse_recipe_args(verify_parser(), args)
    if opts.nproc is not None:
        from bigbatch.parallel.launch import relaunch
        nproc = _positive_int(opts.nproc, "--nproc")
        load_config(opts.recipe, overrides)  # a bad recipe is refused before torchrun starts
        return relaunch("verify", args, nproc)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: also the distributed check
        from bigbatch.tools import verify_distributed
        return verify_distributed.main(load_config(opts.recipe, overrides), float64=opts.float64)
    result = verify_recipe(load_config(opts.recipe, overrides), float64=opts.float64)
    verdict = "OK" if result.passed else "FAILED"
    print(f"accumulation check ({result.dtype}): {result.num_micro_steps} micro-steps of "
          f"{result.micro_batch_size} sequences (target tokens {result.target_counts}) vs one "
          f"batch: max relative error {result.max_relative_error:.2e} "
          f"(tolerance {result.tolerance:.0e}) {verdict}")
    return 0 if result.passed else 1


def cmd_sample(args: list[str]) -> int:
    from bigbatch.tools.sample import sample_text

    parser = Parser("sample", "Generate text from a finished run's model.",
                    ['bigbatch sample runs/tiny --prompt "ROMEO:" --max-new-tokens 200'],
                    recipe=False)
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="default 100")
    parser.add_argument("--temperature", type=float, default=0.8, help="default 0.8")
    parser.add_argument("--top-k", type=int, default=50, help="default 50")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    opts = parser.parse_args(args)
    if opts.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens = {opts.max_new_tokens} must be a positive integer")
    print(sample_text(opts.run_dir, opts.prompt, opts.max_new_tokens, opts.temperature,
                      opts.top_k, opts.seed))
    return 0


def cmd_export(args: list[str]) -> int:
    from bigbatch.tools.export import FORMATS, export

    parser = Parser("export", "Write a finished run in another format.",
                    ["bigbatch export runs/sst2 --format hf --out runs/sst2-hf",
                     "bigbatch export runs/sst2-lora --format hf --merge --out runs/sst2-merged"],
                    recipe=False)
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--format", default="hf", help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", type=Path, required=True, help="the directory to write")
    parser.add_argument("--merge", action="store_true",
                        help="a LoRA run (model.adapter = \"lora\"): merge the adapters into "
                             "the weights and write a plain model (default: the peft adapter "
                             "directory, which PeftModel.from_pretrained loads)")
    opts = parser.parse_args(args)
    written = export(opts.run_dir, opts.out, opts.format, merge=opts.merge)
    print(f"exported {written} to {opts.out}/ (load it with "
          + ("PeftModel.from_pretrained" if written.startswith("LoRA adapter") else
             "from_pretrained") + ")")
    return 0


def cmd_plan(args: list[str]) -> int:
    from bigbatch.planning.ranks import plan_output

    opts, overrides = parse_recipe_args(plan_parser(), args)
    print(plan_output(opts.recipe, overrides, _positive_int(opts.world_size, "--world-size"),
                      opts.from_run and Path(opts.from_run), as_json=opts.json))
    return 0


def cmd_report(args: list[str]) -> int:
    from bigbatch.report.pages import write_report

    parser = Parser("report", "Write RUN_DIR/report.html (or --out).",
                    ["bigbatch report runs/tiny"], recipe=False)
    parser.add_argument("run_dir", type=Path, help="a run directory")
    parser.add_argument("--out", type=Path, default=None, help="default RUN_DIR/report.html")
    opts = parser.parse_args(args)
    print(write_report(opts.run_dir, opts.out))
    return 0


def cmd_compare(args: list[str]) -> int:
    from bigbatch.report.pages import write_compare

    parser = Parser("compare", "Overlay the curves of several runs.",
                    ["bigbatch compare runs/a runs/b --out sweep.html"], recipe=False)
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run directories")
    parser.add_argument("--out", type=Path, default=Path("compare.html"),
                        help="default compare.html")
    opts = parser.parse_args(args)
    print(write_compare(opts.run_dirs, opts.out))
    return 0


def cmd_sweep(args: list[str]) -> int:
    from bigbatch.tools.sweep import parse_batches, run_sweep

    opts, overrides = parse_recipe_args(sweep_parser(), args)
    for required, value in (("--batches", opts.batches), ("--target-loss", opts.target_loss)):
        if value is None:
            raise UsageError(f"bigbatch sweep needs {required}, e.g. --batches 2048,8192,32768 "
                             "--target-loss 2.0")
    try:
        target = float(opts.target_loss)
    except ValueError:
        target = 0.0
    if not target > 0:
        raise UsageError(f"--target-loss = {opts.target_loss!r} must be a positive "
                         "validation loss")
    stem = Path(opts.recipe).stem if opts.recipe else "default"
    out = Path(opts.out or f"runs/sweep-{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    max_tokens, eval_every = (0 if value is None else _positive_int(value, flag) for flag, value
                              in (("--max-tokens", opts.max_tokens),
                                  ("--eval-every-tokens", opts.eval_every_tokens)))
    run_sweep(opts.recipe, overrides, parse_batches(opts.batches), target, out, max_tokens,
              eval_every)
    return 0


def cmd_cbs(args: list[str]) -> int:
    from bigbatch.tools.cbs import FLAG_DEFAULTS, run_cbs_flags

    parser = Parser("cbs", "A run's critical batch, by branching from its checkpoints at 1x-8x "
                    "its batch: writes RUN_DIR/cbs.json, cbs.png (overrides: the branches').", [
                        "bigbatch cbs runs/tiny --factors 0.25,0.5,1,2 --train.eval_tokens=16384",
                        "(of a run such as: bigbatch train configs/tiny.toml --out runs/tiny "
                        "--checkpoint.every_steps=25 --checkpoint.keep=100)"],
                    recipe=False)
    parser.add_argument("run_dir", type=Path, help="a run directory holding 2+ checkpoints")
    for flag, (metavar, default) in FLAG_DEFAULTS.items():
        parser.add_argument(flag, metavar=metavar, help=f"default {default}")
    overrides, rest = split_overrides(args)
    opts = parser.parse_args(rest)
    run_cbs_flags(opts.run_dir, {flag: getattr(opts, flag[2:].replace("-", "_"))
                                 for flag in FLAG_DEFAULTS}, overrides)
    return 0


RECIPE_PARSERS = {"train": train_parser, "config": config_parser, "plan": plan_parser,
                  "verify": verify_parser, "sweep": sweep_parser}

COMMANDS = {"train": cmd_train, "config": cmd_config, "verify": cmd_verify, "sample": cmd_sample,
            "plan": cmd_plan, "report": cmd_report, "compare": cmd_compare,
            "sweep": cmd_sweep, "cbs": cmd_cbs,
            "export": cmd_export}


def _positive_int(text: str | bool, name: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise UsageError(f"{name} = {text!r} must be a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage:\n{USAGE}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if "--debug" in rest:  # also third-party libraries' own output (model/hf.py), in every rank
        os.environ["BIGBATCH_DEBUG"] = "1"
    if command not in COMMANDS:
        print(f"bigbatch: error: unknown command {command!r}: choose one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from bigbatch.parallel.launch import launcher_folder, report_to_launcher

    launcher = launcher_folder()  # a worker of `--nproc`: the launcher prints errors, once
    try:
        return COMMANDS[command](rest)
    except CommandDone as done:  # --help was answered
        return done.status
    except UsageError as err:
        told = report_to_launcher(launcher, err)
        if "--debug" in rest:
            raise
        if not told:
            print(f"bigbatch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a worker's crash: its traceback goes to the launcher's log
        if "--debug" in rest or not report_to_launcher(launcher, err):
            raise
        return 1
