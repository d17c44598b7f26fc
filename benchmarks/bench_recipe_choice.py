"""Which optimizer and schedule the default recipe should use: AdamW or Muon, cosine or WSD.

`bigbatch train` with no arguments (the default recipe: a 10M GPT on the embedded corpus, the
`auto` batch ramp from 8,192 tokens, 30 x 65,536 = 1.97M tokens) run per arm and seed, each a
fresh process; the arms change only the optimizer and the decay, and optionally the token budget
(`--budgets 30 20`: train.max_steps, in full 65,536-token batches), so a shorter run of a better
arm can be set against today's default:

    adamw-cosine   today's default
    adamw-wsd      the same with warmup-stable-decay (20% 1-sqrt cooldown)
    muon-cosine    Muon on the hidden matrices (AdamW for the rest) at the same lr
    muon-wsd       both

The lr is the recipe's (1e-3 at 65,536 tokens, sqrt-scaled to each step's batch) for both
optimizers: `optim.muon_adjust_lr = "match_rms_adamw"` is meant to carry AdamW's lr over
(Moonlight; torchtitan), and this benchmark tests that it does, not a tuned Muon lr.
Evaluation every 20 steps on the recipe's 32,768 validation tokens; tokens and steps to each
validation loss every run reaches are interpolated between evaluations (bench_batch_choice's
analysis), with mean and min-max over seeds. On a GPU (`--device cuda`) several runs share the
card at once (`--jobs`): the 10M model leaves it mostly idle.

    python benchmarks/bench_recipe_choice.py --device cuda --jobs 6 --seeds 3 --budgets 30 20
    python benchmarks/bench_recipe_choice.py --keep DIR --analyse-only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch_choice import crossing, loss_levels, plot, spread, summarize_run  # noqa: E402
from common import ROOT, compare_page, machine_description, run_child, today, write_section  # noqa: E402

PLOT = ROOT / "benchmarks" / "recipe_choice.png"
ARMS = {
    "adamw-cosine": ["--optim.name=adamw", "--optim.decay=cosine"],
    "adamw-wsd": ["--optim.name=adamw", "--optim.decay=wsd"],
    "muon-cosine": ["--optim.name=muon", "--optim.decay=cosine"],
    "muon-wsd": ["--optim.name=muon", "--optim.decay=wsd"],
}
SEEDS = (1337, 1338, 1339, 1340, 1341)
COMMON = ["--train.eval_every=20", "--checkpoint.every_steps=0", "--checkpoint.every_minutes=0"]


def train_command(out: Path, arm: str, budget: int, seed: int, device: str,
                  cache: Path) -> list[str]:
    return [sys.executable, "-m", "bigbatch", "train", *COMMON, *ARMS[arm],
            f"--train.max_steps={budget}", f"--train.seed={seed}", f"--train.device={device}",
            f"--data.cache_dir={cache}", "--out", str(out)]


def render(results: dict[str, list[dict]], levels: list[float], args: argparse.Namespace,
           device_name: str) -> str:
    lines = [f"Measured {today()} on {device_name}.", "",
             f"Command: `python benchmarks/bench_recipe_choice.py --device {args.device} --jobs "
             f"{args.jobs} --seeds {args.seeds} --budgets {' '.join(map(str, args.budgets))}` "
             f"(each run: `bigbatch train {' '.join(COMMON)} <arm> --train.max_steps=BUDGET "
             "--train.seed=S`, seeds 1337 on).", "",
             "Mean (min-max over seeds). Tokens and steps to a validation loss are interpolated "
             "between evaluations; 'not reached' counts the seeds that did not.", "",
             "| arm (budget in 65,536-token batches) | optimizer steps | final val loss | "
             + " | ".join(f"tokens to {v:.2f}" for v in levels) + " | "
             + " | ".join(f"steps to {v:.2f}" for v in levels) + " | training time (s) |",
             "|---|---:|---:|" + "---:|" * (2 * len(levels)) + "---:|"]
    for arm, runs in results.items():
        cross = [[crossing(r["evals"], v) for r in runs if r["best"] <= v] for v in levels]

        def cell(values: list[float], fmt: str, total: int = len(runs)) -> str:
            missing = total - len(values)
            return spread(values, fmt) + (f", {missing} not" if values and missing else "")
        lines.append(
            f"| {arm} | {spread([r['steps'] for r in runs], ',.0f')} | "
            f"{spread([r['final'] for r in runs], '.3f')} | "
            + " | ".join(cell([c[0] / 1e6 for c in cs], '.2f') + "M" * bool(cs) for cs in cross)
            + " | " + " | ".join(cell([c[1] for c in cs], ',.0f') for cs in cross) + " | "
            + f"{spread([r['train_s'] for r in runs], ',.0f')} |")
    lines += ["", "![validation loss against tokens and steps](benchmarks/recipe_choice.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", type=int, nargs="+", default=[30],
                        help="train.max_steps values (65,536-token batches); the recipe's is 30")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--levels", type=float, nargs="*", help="losses to report (default: "
                        "four that every run reaches, and the recipe's 4.525)")
    parser.add_argument("--keep", type=Path, help="keep the runs here; finished ones are reused")
    parser.add_argument("--analyse-only", action="store_true", help="only read --keep's runs")
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("bench_recipe_choice: skipped: no CUDA device")
            return
        device_name = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    else:
        device_name = machine_description()
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        cache = scratch / "cache"
        arms = [(arm, budget) for budget in args.budgets for arm in ARMS]
        todo = [(arm, budget, seed) for seed in SEEDS[:args.seeds] for arm, budget in arms]

        def one(job: tuple[str, int, int]) -> None:
            arm, budget, seed = job
            out = scratch / f"{arm}-{budget}-{seed}"
            if (out / "model.safetensors").is_file() or args.analyse_only:
                return
            threads = ("2" if args.device == "cuda"  # the card's host has cores for all jobs
                       else "1" if args.jobs > 1 else "2")
            run = run_child(train_command(out, arm, budget, seed, args.device, cache),
                            scratch / f"{out.name}.log", env={"OMP_NUM_THREADS": threads})
            if run.returncode:
                sys.exit(f"{out.name} failed (exit {run.returncode}):\n{run.log[-2000:]}")
            print(f"{out.name}: {run.wall_s:.0f}s, {run.log.strip().splitlines()[-3]}",
                  flush=True)

        one(todo[0])  # alone first: it tokenizes the corpus into the shared cache
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, todo[1:]))
        results = {f"{arm} ({budget})": [summarize_run(scratch / f"{arm}-{budget}-{seed}")
                                         for seed in SEEDS[:args.seeds]]
                   for arm, budget in arms}
        runs = [r for rs in results.values() for r in rs]
        levels = args.levels or sorted({*loss_levels(runs, count=3), 4.525}, reverse=True)
        plot(results, PLOT)
        markdown = render(results, levels, args, device_name)
        print(markdown)
        compare = [scratch / f"{arm}-{budget}-{SEEDS[0]}" for arm, budget in arms]
        compare_page(compare, scratch)
        if not args.no_write:
            mean_final = {arm: statistics.fmean(r["final"] for r in rs)
                          for arm, rs in results.items()}
            best = min(mean_final, key=mean_final.get)
            write_section(f"bench_recipe_choice_{args.device}",
                          "## The default recipe's optimizer and schedule (bench_recipe_choice, "
                          f"{args.device})\n\n{markdown}\n\nLowest mean final loss: {best} "
                          f"({mean_final[best]:.3f}).")


if __name__ == "__main__":
    main()
