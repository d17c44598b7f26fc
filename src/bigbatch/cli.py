"""The `bigbatch` command: subcommands only, no training logic.

    bigbatch train  [RECIPE] [--out DIR] [--resume auto|PATH] [--nproc N] [--section.field=VALUE ...]
    bigbatch config [RECIPE] [--world-size N] [--section.field=VALUE ...]
    bigbatch plan   [RECIPE] [--json] [--world-size N] [--section.field=VALUE ...]
    bigbatch verify [RECIPE] [--float64] [--nproc N] [--section.field=VALUE ...]
    bigbatch sample RUN_DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K]
    bigbatch report RUN_DIR [--out FILE.html]
    bigbatch compare RUN_DIR RUN_DIR... [--out FILE.html]
    bigbatch sweep  [RECIPE] --batches A,B,... --target-loss X [--out DIR] [--max-tokens N]
                    [--eval-every-tokens N] [--section.field=VALUE ...]
    bigbatch export RUN_DIR --format hf --out DIR

Bad input is one line on stderr and exit code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bigbatch.errors import UsageError

USAGE = __doc__.split("\n\n")[1]


@dataclass
class RunArgs:
    """What a recipe-taking subcommand was given: the recipe, overrides, and its own flags."""

    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    flags: dict[str, str | bool] = field(default_factory=dict)


def parse_run_args(args: list[str], valued: set[str], switches: set[str]) -> RunArgs:
    """Split `[RECIPE] [--flag VALUE] [--switch] [--section.field=VALUE]` by hand, because a
    space-separated override value (`--data.seq_len 128`) must not be taken for the recipe."""
    parsed = RunArgs()
    i = 0
    while i < len(args):
        arg = args[i]
        name, has_value, value = arg.partition("=")
        if name in switches:
            parsed.flags[name] = True
        elif name in valued:
            if not has_value:
                if i + 1 >= len(args):
                    raise UsageError(f"{name} needs a value")
                i, value = i + 1, args[i + 1]
            parsed.flags[name] = value
        elif arg.startswith("--") and "." in name:
            parsed.overrides.append(arg)
            if not has_value and i + 1 < len(args):
                i += 1
                parsed.overrides.append(args[i])
        elif not arg.startswith("-") and parsed.recipe is None:
            parsed.recipe = arg
        else:
            allowed = sorted(valued | switches)
            raise UsageError(f"unexpected argument {arg!r}: expected a recipe file, "
                             f"--section.field=VALUE overrides, or one of {', '.join(allowed)}")
        i += 1
    return parsed


def cmd_train(args: list[str]) -> int:
    from bigbatch.config_files import load_config

    run = parse_run_args(args, valued={"--out", "--nproc", "--resume"}, switches={"--debug"})
    cfg = load_config(run.recipe, run.overrides)
    stem = Path(run.recipe).stem if run.recipe else "default"
    out = Path(str(run.flags.get("--out") or f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
    if "--nproc" in run.flags:  # every rank must get the same --out, so it is fixed here
        from bigbatch.launch import relaunch, without_flag
        return relaunch("train", [*without_flag(args, "--out"), "--out", str(out)],
                        _positive_int(run.flags["--nproc"], "--nproc"))
    from bigbatch.run import train  # not before: the --nproc launcher never needs torch

    # 128 + the signal number when SIGTERM/SIGINT stopped it early with a checkpoint, else 0.
    return train(cfg, out, resume=run.flags.get("--resume")).exit_code


def cmd_config(args: list[str]) -> int:
    from bigbatch.batch_schedule import build_batch_schedule, describe_schedule
    from bigbatch.batching import plan_batch
    from bigbatch.config_files import config_to_toml, field_docs, load_config
    from bigbatch.engine.schedule import describe_lr_scaling

    run = parse_run_args(args, valued={"--world-size"}, switches={"--debug", "--fields"})
    if run.flags.get("--fields"):
        for key, default, doc in field_docs():
            print(f"{key} = {default!r}\n    {doc}")
        return 0
    cfg = load_config(run.recipe, run.overrides)
    world_size = _positive_int(run.flags.get("--world-size", "1"), "--world-size")
    print(config_to_toml(cfg))
    if cfg.train.task == "classify":
        from bigbatch.tasks.classify import sequence_plan

        plan = sequence_plan(cfg.batch.global_sequences, cfg.batch.micro_batch_size,
                             cfg.batch.micro_batch_tokens, cfg.data.max_length, world_size)
        print(f"# {plan.describe()}")
        return 0
    if cfg.batch.micro_batch_size == "auto":
        print("# micro_batch_size = \"auto\": `bigbatch plan` shows what training will choose")
        return 0
    plan = plan_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size,
                      world_size)
    print(f"# {plan.describe()}")
    print(f"# num_micro_steps = global_tokens / (micro_batch_size * seq_len * world_size) = "
          f"{plan.global_tokens} / ({plan.micro_batch_size} * {plan.seq_len} * "
          f"{plan.world_size}) = {plan.num_micro_steps}")
    reference = cfg.optim.reference_batch_tokens or plan.global_tokens
    print("# " + describe_lr_scaling(cfg.optim.lr, cfg.optim.lr_scaling, plan.global_tokens,
                                     reference))
    for line in describe_schedule(build_batch_schedule(cfg, plan)):
        print(f"# {line}")
    return 0


def cmd_verify(args: list[str]) -> int:
    from bigbatch.config_files import load_config
    from bigbatch.verify import verify

    run = parse_run_args(args, valued={"--nproc"}, switches={"--debug", "--float64"})
    if "--nproc" in run.flags:
        from bigbatch.launch import relaunch
        return relaunch("verify", args, _positive_int(run.flags["--nproc"], "--nproc"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: also the distributed check
        from bigbatch import verify_distributed
        return verify_distributed.main(load_config(run.recipe, run.overrides),
                                       float64=bool(run.flags.get("--float64")))
    result = verify(load_config(run.recipe, run.overrides), float64=bool(run.flags.get("--float64")))
    verdict = "OK" if result.passed else "FAILED"
    print(f"accumulation check ({result.dtype}): {result.num_micro_steps} micro-steps of "
          f"{result.micro_batch_size} sequences (target tokens {result.target_counts}) vs one "
          f"batch: max relative error {result.max_relative_error:.2e} "
          f"(tolerance {result.tolerance:.0e}) {verdict}")
    return 0 if result.passed else 1


def cmd_sample(args: list[str]) -> int:
    import torch

    from bigbatch.artifacts import load_model

    parser = argparse.ArgumentParser(prog="bigbatch sample")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true")
    opts = parser.parse_args(args)
    if opts.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens = {opts.max_new_tokens} must be a positive integer")
    model, tokenizer = load_model(opts.run_dir)
    ids = tokenizer.encode(opts.prompt).ids or [tokenizer.token_to_id("<|endoftext|>")]
    generator = torch.Generator().manual_seed(opts.seed)
    out = model.generate(torch.tensor([ids]), opts.max_new_tokens, opts.temperature,
                         opts.top_k, generator)
    print(tokenizer.decode(out[0].tolist()))
    return 0


def cmd_export(args: list[str]) -> int:
    from bigbatch.export import FORMATS, export

    parser = argparse.ArgumentParser(prog="bigbatch export")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--format", default="hf", help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--debug", action="store_true")
    opts = parser.parse_args(args)
    written = export(opts.run_dir, opts.out, opts.format)
    print(f"exported {written} to {opts.out}/ (load it with from_pretrained)")
    return 0


def cmd_plan(args: list[str]) -> int:
    import json

    from bigbatch.config_files import load_config
    from bigbatch.plan.planner import describe_plan, plan_for_config, probe_device

    run = parse_run_args(args, valued={"--world-size"}, switches={"--debug", "--json"})
    cfg = load_config(run.recipe, run.overrides)
    world_size = _positive_int(run.flags.get("--world-size", "1"), "--world-size")
    # The logits' width is the tokenizer's real vocabulary: a local tokenizer directory has its
    # own size, whatever data.vocab_size says (that only sizes a BPE bigbatch trains itself).
    vocab_size = cfg.data.vocab_size
    if cfg.data.tokenizer:
        from bigbatch.data.tokenizer import load_tokenizer_dir

        vocab_size = load_tokenizer_dir(cfg.data.tokenizer).get_vocab_size()
    plan = plan_for_config(cfg, vocab_size, world_size=world_size,
                           device=probe_device(cfg.train.device))
    print(json.dumps(plan.to_dict()) if run.flags.get("--json") else "\n".join(describe_plan(plan)))
    return 0


def cmd_report(args: list[str]) -> int:
    from bigbatch.report import write_report

    parser = argparse.ArgumentParser(prog="bigbatch report",
                                     description="Write RUN_DIR/report.html (or --out).")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--debug", action="store_true")
    opts = parser.parse_args(args)
    print(write_report(opts.run_dir, opts.out))
    return 0


def cmd_compare(args: list[str]) -> int:
    from bigbatch.report import write_compare

    parser = argparse.ArgumentParser(prog="bigbatch compare",
                                     description="Overlay the curves of several runs.")
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("compare.html"))
    parser.add_argument("--debug", action="store_true")
    opts = parser.parse_args(args)
    print(write_compare(opts.run_dirs, opts.out))
    return 0


def cmd_sweep(args: list[str]) -> int:
    from bigbatch.sweep import parse_batches, run_sweep

    run = parse_run_args(args, valued={"--batches", "--target-loss", "--out", "--max-tokens",
                                       "--eval-every-tokens"}, switches={"--debug"})
    for required in ("--batches", "--target-loss"):
        if required not in run.flags:
            raise UsageError(f"bigbatch sweep needs {required}, e.g. --batches 2048,8192,32768 "
                             "--target-loss 2.0")
    try:
        target = float(run.flags["--target-loss"])
    except ValueError:
        target = 0.0
    if not target > 0:
        raise UsageError(f"--target-loss = {run.flags['--target-loss']!r} must be a positive "
                         "validation loss")
    stem = Path(run.recipe).stem if run.recipe else "default"
    out = Path(str(run.flags.get("--out") or f"runs/sweep-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"))
    optional = {flag: _positive_int(run.flags[flag], flag) if flag in run.flags else 0
                for flag in ("--max-tokens", "--eval-every-tokens")}
    run_sweep(run.recipe, run.overrides, parse_batches(str(run.flags["--batches"])), target, out,
              optional["--max-tokens"], optional["--eval-every-tokens"])
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "verify": cmd_verify, "sample": cmd_sample,
            "plan": cmd_plan, "report": cmd_report, "compare": cmd_compare,
            "sweep": cmd_sweep,
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
    if command not in COMMANDS:
        print(f"bigbatch: error: unknown command {command!r}: choose one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except UsageError as err:
        if "--debug" in rest:
            raise
        print(f"bigbatch: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
