"""Which batch schedule to pay for: fixed small, fixed large, doubling, linear and `auto`.

The tiny recipe (configs/tiny.toml: a 2-layer, d_model 128 GPT) on tinyshakespeare, the same
token budget for every arm (the recipe's 150 x 8,192 = 1,228,800 tokens), several seeds per arm.
Micro-batches are 4 x 128 = 512 tokens so that the smallest batch the noise scale can be measured
with (2 micro-steps) is 1,024 tokens. Every arm scales the peak lr (the recipe's 3e-3 at 8,192
tokens) to each step's batch by the square-root rule (Malladi et al. 2022) and places it on the
token-counted schedule, so warmup (81,920 tokens) and decay span the same tokens in every arm:

    fixed-1024   1,024 tokens every step (1,200 steps)
    fixed-8192   the recipe's 8,192 tokens (150 steps)
    doubling     1,024 -> 2,048 -> 4,096 -> 8,192, doubling every 204,800 tokens (full at half the
                 budget: Merrill et al. 2025's doubling batch warmup, by hand)
    linear       1,024 -> 8,192 linearly over the first half of the budget
    auto         from 1,024, doubling towards the measured noise scale (batch.ramp = "auto")

Each run is `bigbatch train` (the product's own loop and metrics.jsonl, a fresh process); the
validation rows give tokens and optimizer steps to each of several losses that every run reaches
(interpolated linearly between evaluations), the final loss and the training time (the sum of
step_seconds; evaluations excluded). Mean and min-max over seeds. The plot (validation loss
against tokens and against steps, one colour per arm, the band is the seeds' min-max) goes into
BENCHMARKS.md, and `bigbatch compare` of each arm's first seed writes the compare page.

    python benchmarks/bench_batch_choice.py [--seeds N] [--keep DIR] [--jobs J] [--no-write]
    python benchmarks/bench_batch_choice.py --keep DIR --analyse-only   # tables from kept runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, compare_page, loadavg, machine_description, run_child, today, write_section  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PLOT = ROOT / "benchmarks" / "batch_choice.png"
COMMON = ["--batch.micro_batch_size=4", "--optim.lr_scaling=sqrt",
          "--optim.reference_batch_tokens=8192", "--train.eval_tokens=16384",
          "--checkpoint.every_steps=0", "--checkpoint.every_minutes=0", "--train.device=cpu"]
HALF_BUDGET = 75 * 8192
ARMS = {  # name: overrides of configs/tiny.toml; evaluation about every 40K tokens at 8,192
    "fixed-1024": ["--batch.global_tokens=1024", "--train.max_steps=1200",
                   "--optim.warmup_steps=80", "--train.eval_every=40"],
    "fixed-8192": ["--train.eval_every=5"],
    "doubling": ["--batch.ramp=doubling", "--batch.ramp_start_tokens=1024",
                 f"--batch.ramp_tokens={HALF_BUDGET}", "--train.eval_every=10"],
    "linear": ["--batch.ramp=linear", "--batch.ramp_start_tokens=1024",
               f"--batch.ramp_tokens={HALF_BUDGET}", "--train.eval_every=10"],
    "auto": ["--batch.ramp=auto", "--batch.ramp_start_tokens=1024", "--train.eval_every=10"],
}
SEEDS = (1337, 1338, 1339, 1340, 1341)


def train_command(out: Path, arm: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "bigbatch", "train", "configs/tiny.toml",
            f"--data.path={DATA}", *COMMON, *ARMS[arm], f"--train.seed={seed}", "--out", str(out)]


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def crossing(points: list[tuple[float, float, float]], level: float) -> tuple[float, float]:
    """(tokens, steps) where the validation loss first falls to `level`, interpolated linearly
    between the two evaluations around it; points are (tokens, steps, val_loss)."""
    for (t0, s0, l0), (t1, s1, l1) in zip(points, points[1:], strict=False):
        if l1 <= level < l0:
            f = (l0 - level) / (l0 - l1)
            return t0 + f * (t1 - t0), s0 + f * (s1 - s0)
    raise ValueError(f"never reached {level}")


def summarize_run(run_dir: Path) -> dict:
    rows = read_rows(run_dir)
    evals = [(r["tokens"], r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    steps = [r for r in rows if "loss" in r]
    return {"evals": evals, "final": evals[-1][2], "best": min(v for _, _, v in evals),
            "train_s": sum(r["step_seconds"] for r in steps), "steps": steps[-1]["step"],
            "batches": (steps[0]["global_tokens"], steps[-1]["global_tokens"]),
            "noise": steps[-1].get("gns_tokens")}


def loss_levels(runs: list[dict], count: int = 4, gap: float = 0.25) -> list[float]:
    """`count` validation losses every run reaches, `gap` apart: from the highest best loss of
    any run (rounded up to 0.05) upwards, highest first."""
    floor = max(run["best"] for run in runs)
    floor = -(-floor * 20 // 1) / 20  # up to the next 0.05: every run is at or below it
    return [round(floor + i * gap, 2) for i in reversed(range(count))]


def deep_level(results: dict[str, list[dict]]) -> float:
    """A lower loss, which every run of every arm but the worst-ending one reaches: where the
    arms that keep learning part."""
    worst = max(results, key=lambda arm: statistics.fmean(r["final"] for r in results[arm]))
    rest = [r for arm, runs in results.items() if arm != worst for r in runs]
    return -(-max(r["best"] for r in rest) * 20 // 1) / 20


def spread(values: list[float], fmt: str) -> str:
    if not values:
        return "not reached"
    mean = statistics.fmean(values)
    return f"{mean:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def render(results: dict[str, list[dict]], levels: list[float], load: list[float],
           seeds: int) -> str:
    lines = [f"Measured {today()} on {machine_description()}.", "",
             f"Command: `python benchmarks/bench_batch_choice.py --seeds {seeds} --jobs 2` (each "
             "run: `bigbatch train configs/tiny.toml --data.path=../shared/data/tinyshakespeare/"
             f"input.txt {' '.join(COMMON)} <arm> --train.seed=S`, OMP_NUM_THREADS=1, two runs at "
             "a time).", "",
             f"Load: other processes used {min(load):.1f}-{max(load):.1f} cores (mean "
             f"{statistics.fmean(load):.1f}) during the runs on this shared 2-core machine, so "
             "times are slowed and noisy; tokens, steps and losses do not depend on it.", "",
             f"Same budget for every arm: 1,228,800 tokens; {seeds} seeds per arm; mean "
             "(min-max over seeds). Tokens and steps to a validation loss are interpolated "
             f"between evaluations; the first {len(levels) - 1} losses are reached by every run, "
             f"the last ({levels[-1]:.2f}) by every run but the worst-ending arm's.", "",
             "| arm | batch first -> last | optimizer steps | final val loss | "
             + " | ".join(f"tokens to {v:.2f}" for v in levels) + " | "
             + " | ".join(f"steps to {v:.2f}" for v in levels) + " | training time (s) |",
             "|---|---|---:|---:|" + "---:|" * (2 * len(levels)) + "---:|"]
    for arm, runs in results.items():
        first, last = runs[0]["batches"]
        cross = [[crossing(r["evals"], v) for r in runs if r["best"] <= v] for v in levels]
        lines.append(
            f"| {arm} | {first:,} -> {last:,} | {spread([r['steps'] for r in runs], ',.0f')} | "
            f"{spread([r['final'] for r in runs], '.3f')} | "
            + " | ".join(spread([c[0] / 1000 for c in cs], ',.0f') + "K" * bool(cs)
                         for cs in cross) + " | "
            + " | ".join(spread([c[1] for c in cs], ',.0f') for cs in cross) + " | "
            + f"{spread([r['train_s'] for r in runs], ',.0f')} |")
    lines += ["", "![validation loss against tokens and steps](benchmarks/batch_choice.png)", "",
              "Noise scale B_simple at the last step (tokens), per arm: " + "; ".join(
                  f"{arm} " + spread([r["noise"] for r in runs if r["noise"]], ",.0f")
                  for arm, runs in results.items() if any(r["noise"] for r in runs)) + "."]
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=110, layout="constrained")
    by_tokens, by_steps = fig.subplots(1, 2, sharey=True)
    for colour, (arm, runs) in enumerate(results.items()):
        for ax, index, scale in ((by_tokens, 0, 1e3), (by_steps, 1, 1)):
            # each seed evaluates at its own points: resample on a common grid for the band
            ends = min(r["evals"][-1][index] for r in runs)
            grid = np.linspace(0, ends, 200)
            curves = np.array([np.interp(grid, [p[index] for p in r["evals"]],
                                         [p[2] for p in r["evals"]]) for r in runs])
            ax.plot(grid / scale, curves.mean(0), color=f"C{colour}", label=arm, linewidth=1.4)
            ax.fill_between(grid / scale, curves.min(0), curves.max(0), color=f"C{colour}",
                            alpha=0.2, linewidth=0)
    by_tokens.set_xlabel("training tokens (K)")
    by_steps.set_xlabel("optimizer steps")
    by_steps.set_xscale("log")
    by_tokens.set_ylabel("validation loss (nats/token)")
    top = max(r["evals"][1][2] for runs in results.values() for r in runs)
    by_tokens.set_ylim(min(r["best"] for runs in results.values() for r in runs) - 0.05, top)
    for ax in (by_tokens, by_steps):
        ax.grid(True, alpha=0.3)
    by_tokens.legend(frameon=False)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary "
                        "directory); runs already finished there are reused")
    parser.add_argument("--analyse-only", action="store_true", help="only read --keep's runs")
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not DATA.is_file():
        sys.exit(f"{DATA} is missing: the benchmark needs ../shared/data")
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        # seed-major order: each round holds every arm, so load falls on all arms alike
        todo = [(arm, seed) for seed in SEEDS[:args.seeds] for arm in ARMS]
        load: list[float] = []

        def one(job: tuple[str, int]) -> None:
            arm, seed = job
            out = scratch / f"{arm}-{seed}"
            if (out / "model.safetensors").is_file() or args.analyse_only:
                return
            print(f"{arm} seed {seed}: load average before {loadavg():.1f}", flush=True)
            run = run_child(train_command(out, arm, seed), scratch / f"{arm}-{seed}.log",
                            env={"OMP_NUM_THREADS": "1"})
            load.append(run.other_cores)
            (scratch / f"{arm}-{seed}.load").write_text(f"{run.other_cores}\n")
            if run.returncode:
                sys.exit(f"{arm} seed {seed} failed (exit {run.returncode}):\n{run.log[-2000:]}")
            print(f"{arm} seed {seed}: {run.wall_s:.0f}s, {run.log.strip().splitlines()[-3]}",
                  flush=True)

        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, todo))
        results = {arm: [summarize_run(scratch / f"{arm}-{seed}")
                         for seed in SEEDS[:args.seeds]] for arm in ARMS}
        load = [float((scratch / f"{a}-{s}.load").read_text()) for a, s in todo]
        levels = [*loss_levels([r for runs in results.values() for r in runs]),
                  deep_level(results)]
        plot(results, PLOT)
        markdown = render(results, levels, load, args.seeds)
        print(markdown)
        compare = [scratch / f"{arm}-{SEEDS[0]}" for arm in ARMS]
        compare_page(compare, scratch)
        if not args.no_write:
            write_section("bench_batch_choice", "## Batch choice: fixed, doubling, linear and "
                          "auto (tiny recipe, tinyshakespeare)\n\n" + markdown)


if __name__ == "__main__":
    main()
