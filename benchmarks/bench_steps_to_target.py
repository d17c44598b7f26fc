"""Should Muon and/or warmup-stable-decay be the default? Steps and tokens to a target loss.

The tiny recipe (configs/tiny.toml: a 2-layer, d_model 128 GPT) on tinyshakespeare, the setting of
bench_batch_choice (micro-batches of 4 x 128 tokens, the peak lr 3e-3 at 8,192 tokens scaled to
each step's batch by the square-root rule), with 12 arms of the same token budget:

    optimizer  adamw | muon (`--optim.name=muon`)
    batch      1024: fixed 1,024 tokens | 8192: fixed 8,192 (8x) | auto: `--batch.ramp=auto` from
               1,024 towards the measured noise scale, at most 8,192
    decay      cosine | wsd (`--optim.decay=wsd`: the peak until the last 20%, then 1-sqrt)

Both optimizers use the recipe's lr, 3e-3: Muon's default `muon_adjust_lr = match_rms_adamw`
scales each matrix's update to an AdamW update's RMS so that AdamW's lr carries over (that is the
claim this benchmark also tests); `--lrs` sweeps other lrs (each becomes its own arm). Warmup is
1/15 of the budget and evaluations come about every 1/12 of it, in tokens, in every arm.

Per arm, mean (min-max over seeds): the final validation loss, and tokens and optimizer (serial)
steps to several losses, interpolated between evaluations (bench_batch_choice.crossing). The
headline, per loss: among arms within 10% of the fewest tokens to it, the fewest steps. The plot
(validation loss against tokens and against steps, bands over seeds) is steps_to_target.png; the
compare page holds each arm's first seed. Optimizer step time against AdamW's is
bench_optim_step's section.

    python benchmarks/bench_steps_to_target.py [--seeds N] [--jobs J] [--keep DIR] [--no-write]
        [--budget-tokens T] [--device cpu|cuda] [--lrs 1e-3,3e-3]
    python benchmarks/bench_steps_to_target.py --keep DIR --analyse-only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch_choice import DATA, crossing, loss_levels, spread, summarize_run  # noqa: E402
from common import ROOT, compare_page, loadavg, machine_description, run_child, today, write_section  # noqa: E402

PLOT = ROOT / "benchmarks" / "steps_to_target.png"
SMALL, LARGE = 1024, 8192
TUNED_LR = {"adamw": 3e-3, "muon": 3e-3}  # configs/tiny.toml's lr; Muon's carried over (above)
OPTIMIZERS, BATCHES, DECAYS = ("adamw", "muon"), ("1024", "8192", "auto"), ("cosine", "wsd")
SEEDS = (1337, 1338, 1339, 1340, 1341)
TOKEN_SLACK = 0.10  # the headline's "at most 10% more tokens than the most token-efficient arm"


def common_args(device: str) -> list[str]:
    return ["--batch.micro_batch_size=4", "--optim.lr_scaling=sqrt",
            f"--optim.reference_batch_tokens={LARGE}", "--train.eval_tokens=16384",
            "--checkpoint.every_steps=0", "--checkpoint.every_minutes=0",
            f"--train.device={device}"]


def arm_args(arm: str, budget: int) -> list[str]:
    """configs/tiny.toml overrides of one arm, `optim-batch-decay[@lr]`, at `budget` tokens."""
    name, _, lr = arm.partition("@")
    optim, batch, decay = name.split("-")
    step = SMALL if batch == "1024" else LARGE
    # about 12 evaluations per run: each costs 16,384 tokens' forward pass, a third of training's
    eval_tokens = LARGE * max(1, round(budget / LARGE / 12))
    args = [f"--optim.name={optim}", f"--optim.decay={decay}", f"--optim.lr={lr or TUNED_LR[optim]}",
            f"--batch.global_tokens={step}", f"--train.max_steps={budget // step}",
            f"--optim.warmup_steps={max(1, budget // 15 // step)}"]
    if batch == "auto":  # steps grow from 1,024 to 8,192 tokens: in between, in steps
        return [*args, "--batch.ramp=auto", f"--batch.ramp_start_tokens={SMALL}",
                f"--train.eval_every={eval_tokens // SMALL // 2}"]
    return [*args, f"--train.eval_every={eval_tokens // step}"]


def arm_names(lrs: list[str] | None) -> list[str]:
    names = [f"{o}-{b}-{d}" for o in OPTIMIZERS for b in BATCHES for d in DECAYS]
    return [f"{n}@{lr}" for lr in lrs for n in names] if lrs else names


def train_command(out: Path, arm: str, seed: int, budget: int, device: str) -> list[str]:
    return [sys.executable, "-m", "bigbatch", "train", "configs/tiny.toml", f"--data.path={DATA}",
            *common_args(device), *arm_args(arm, budget), f"--train.seed={seed}", "--out", str(out)]


def to_level(runs: list[dict], level: float) -> tuple[list[float], list[float]] | None:
    """Tokens and steps of each seed to `level`; None unless every seed reaches it."""
    if any(r["best"] > level for r in runs):
        return None
    points = [crossing(r["evals"], level) for r in runs]
    return [p[0] for p in points], [p[1] for p in points]


def headline(reach: dict[str, tuple[float, float] | None], slack: float = TOKEN_SLACK) -> dict:
    """The fewest serial steps among arms within `slack` of the fewest tokens to a loss.

    `reach` maps each arm to its mean (tokens, steps) to that loss, or None where some seed never
    got there (such an arm is never within any slack)."""
    reached = {arm: ts for arm, ts in reach.items() if ts is not None}
    if not reached:
        raise ValueError("no arm reaches the loss")
    thrifty = min(reached, key=lambda arm: reached[arm][0])
    ceiling = reached[thrifty][0] * (1 + slack)
    eligible = [arm for arm, (tokens, _) in reached.items() if tokens <= ceiling]
    fastest = min(eligible, key=lambda arm: (reached[arm][1], reached[arm][0]))
    return {"arm": fastest, "steps": reached[fastest][1], "tokens": reached[fastest][0],
            "thrifty": thrifty, "thrifty_tokens": reached[thrifty][0],
            "thrifty_steps": reached[thrifty][1], "eligible": eligible}


def deep_levels(results: dict[str, list[dict]], quantiles: tuple[float, ...] = (0.75, 0.5, 0.25)
                ) -> list[float]:
    """Losses that every seed of the better `q` share of arms reaches (rounded up to 0.05): the
    targets where the arms that keep learning part."""
    worst_seed = sorted(max(r["best"] for r in runs) for runs in results.values())
    picks = [worst_seed[max(0, round(q * len(worst_seed)) - 1)] for q in quantiles]
    return sorted({-(-v * 20 // 1) / 20 for v in picks}, reverse=True)


def means(results: dict[str, list[dict]], level: float) -> dict[str, tuple[float, float] | None]:
    out = {}
    for arm, runs in results.items():
        hit = to_level(runs, level)
        out[arm] = None if hit is None else (statistics.fmean(hit[0]), statistics.fmean(hit[1]))
    return out


def muon_time_ratios(results: dict[str, list[dict]]) -> dict[str, float]:
    """Mean training time of each Muon arm over that of the AdamW arm it mirrors."""
    return {arm: statistics.fmean(r["train_s"] for r in runs)
            / statistics.fmean(r["train_s"] for r in results["adamw" + arm[len("muon"):]])
            for arm, runs in results.items()
            if arm.startswith("muon") and "adamw" + arm[len("muon"):] in results}


def render(results: dict[str, list[dict]], levels: list[float], load: list[float], seeds: int,
           budget: int, command: str) -> str:
    lines = [f"Measured {today()} on {machine_description()}.", "",
             f"Command: `{command}` (each run: `bigbatch train configs/tiny.toml "
             "--data.path=../shared/data/tinyshakespeare/input.txt "
             f"{' '.join(common_args('cpu'))} <arm> --train.seed=S`; seeds "
             f"{', '.join(map(str, SEEDS[:seeds]))}; OMP_NUM_THREADS=1).", "",
             f"Load: other processes used {min(load):.1f}-{max(load):.1f} cores (mean "
             f"{statistics.fmean(load):.1f}) during the runs, so times are noisy; tokens, steps "
             "and losses do not depend on it." if load else "Load: not measured (kept runs).", "",
             f"Same budget for every arm: {budget:,} tokens; {seeds} seeds per arm; mean (min-max "
             "over seeds). Tokens (K) and optimizer steps to a validation loss are interpolated "
             f"between evaluations; {', '.join(f'{v:.2f}' for v in levels)}: the first "
             "losses are reached by every run, the deeper ones only by the better arms (\"not "
             "reached\": some seed never got there).", "",
             "| arm | optimizer steps | final val loss | "
             + " | ".join(f"tokens to {v:.2f}" for v in levels) + " | "
             + " | ".join(f"steps to {v:.2f}" for v in levels) + " | training time (s) |",
             "|---|---:|---:|" + "---:|" * (2 * len(levels)) + "---:|"]
    for arm, runs in results.items():
        hits = [to_level(runs, v) for v in levels]
        lines.append(
            f"| {arm} | {spread([r['steps'] for r in runs], ',.0f')} | "
            f"{spread([r['final'] for r in runs], '.3f')} | "
            + " | ".join(spread([t / 1000 for t in h[0]], ',.0f') + "K" if h else "not reached"
                         for h in hits) + " | "
            + " | ".join(spread(h[1], ',.0f') if h else "not reached" for h in hits) + " | "
            + f"{spread([r['train_s'] for r in runs], ',.0f')} |")
    lines += ["", f"Headline, per loss: the arm with the fewest tokens to it, and among the arms "
              f"within {TOKEN_SLACK:.0%} of those tokens the one with the fewest serial steps.",
              "", "| loss | fewest tokens: arm, tokens, steps | fewest steps within "
              f"{TOKEN_SLACK:.0%}: arm, steps, tokens | steps saved | arms within |",
              "|---:|---|---|---:|---|"]
    for v in levels:
        h = headline(means(results, v))
        lines.append(f"| {v:.2f} | {h['thrifty']}, {h['thrifty_tokens'] / 1000:,.0f}K, "
                     f"{h['thrifty_steps']:,.0f} | **{h['arm']}, {h['steps']:,.0f} steps**, "
                     f"{h['tokens'] / 1000:,.0f}K (+{h['tokens'] / h['thrifty_tokens'] - 1:.0%}) "
                     f"| {1 - h['steps'] / h['thrifty_steps']:.0%} | {', '.join(h['eligible'])} |")
    deepest = headline(means(results, levels[-1]))
    lines += ["", f"**Headline** (the deepest loss, {levels[-1]:.2f}): {deepest['arm']} reaches "
              f"it in {deepest['steps']:,.0f} serial steps and {deepest['tokens'] / 1000:,.0f}K "
              f"tokens, against {deepest['thrifty_steps']:,.0f} steps and "
              f"{deepest['thrifty_tokens'] / 1000:,.0f}K tokens for the most token-efficient arm, "
              f"{deepest['thrifty']}."]
    lines += ["", "![validation loss against tokens and steps](benchmarks/steps_to_target.png)", "",
              "Optimizer step time against AdamW's is bench_optim_step's (`python benchmarks/"
              "bench_optim_step.py [--device cuda]`, sections bench_optim_step and "
              "bench_optim_step_cuda). Here, training time (the sum of step_seconds, evaluations "
              "excluded, on a shared machine) of Muon against AdamW, same batch and decay: "
              + "; ".join(f"{arm[len('muon-'):]} {ratio:.2f}x" for arm, ratio in
                          muon_time_ratios(results).items()) + ".", "",
              "The compare page (each arm's first seed): `bigbatch compare DIR/<arm>-"
              f"{SEEDS[0]} ... --out compare.html` after `--keep DIR` (the script writes "
              "`DIR/compare.html`)."]
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), dpi=110, layout="constrained")
    by_tokens, by_steps = fig.subplots(1, 2, sharey=True)
    colours = {}
    for arm, runs in results.items():
        name = arm.split("@")[0]
        kind = name.rsplit("-", 1)[0]  # optimizer and batch: one colour; decay: the line style
        colour = colours.setdefault(kind, f"C{len(colours)}")
        style = "--" if name.endswith("wsd") else "-"
        for ax, index, scale in ((by_tokens, 0, 1e3), (by_steps, 1, 1)):
            ends = min(r["evals"][-1][index] for r in runs)
            grid = np.linspace(0, ends, 200)
            curves = np.array([np.interp(grid, [p[index] for p in r["evals"]],
                                         [p[2] for p in r["evals"]]) for r in runs])
            ax.plot(grid / scale, curves.mean(0), style, color=colour, label=arm, linewidth=1.2)
            ax.fill_between(grid / scale, curves.min(0), curves.max(0), color=colour,
                            alpha=0.12, linewidth=0)
    by_tokens.set_xlabel("training tokens (K)")
    by_steps.set_xlabel("optimizer steps")
    by_steps.set_xscale("log")
    by_steps.set_xlim(left=1)
    by_tokens.set_ylabel("validation loss (nats/token)")
    top = max(r["evals"][1][2] for runs in results.values() for r in runs)
    by_tokens.set_ylim(min(r["best"] for runs in results.values() for r in runs) - 0.05, top)
    for ax in (by_tokens, by_steps):
        ax.grid(True, alpha=0.3)
    by_steps.legend(frameon=False, fontsize=7, ncol=2)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, help="runs at a time, one thread each (default: 2 "
                        "on cpu, 6 on cuda: the tiny model leaves a GPU mostly idle)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--budget-tokens", type=int, default=150 * LARGE,
                        help="tokens per run, a multiple of 8,192 (smaller for a smoke test)")
    parser.add_argument("--lrs", help="comma-separated peak lrs to sweep, each lr an arm of "
                        "every setting (default: the recipe's lr for both optimizers)")
    parser.add_argument("--arms", help="comma-separated subset of the arms (a smoke test)")
    parser.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary "
                        "directory); runs already finished there are reused")
    parser.add_argument("--analyse-only", action="store_true", help="only read --keep's runs")
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.budget_tokens <= 0 or args.budget_tokens % LARGE:
        sys.exit(f"--budget-tokens {args.budget_tokens}: want a positive multiple of {LARGE}")
    if not DATA.is_file():
        sys.exit(f"{DATA} is missing: the benchmark needs ../shared/data")
    arms = arm_names(args.lrs.split(",") if args.lrs else None)
    if args.arms:
        arms = [a for a in arms if a in args.arms.split(",")]
    jobs = args.jobs or (6 if args.device == "cuda" else 2)
    command = (f"python benchmarks/bench_steps_to_target.py --seeds {args.seeds} --jobs {jobs} "
               f"--budget-tokens {args.budget_tokens} --device {args.device}"
               + (f" --lrs {args.lrs}" if args.lrs else "") + " --keep DIR")
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        # seed-major order: each round holds every arm, so load falls on all arms alike
        todo = [(arm, seed) for seed in SEEDS[:args.seeds] for arm in arms]

        def one(job: tuple[str, int]) -> None:
            arm, seed = job
            out = scratch / f"{arm}-{seed}"
            if (out / "model.safetensors").is_file() or args.analyse_only:
                return
            print(f"{arm} seed {seed}: load average before {loadavg():.1f}", flush=True)
            # a run cut short (the benchmark stopped) starts over: its curve must be whole
            again = ["--overwrite"] if out.exists() else []
            run = run_child([*train_command(out, arm, seed, args.budget_tokens, args.device),
                             *again], scratch / f"{arm}-{seed}.log", env={"OMP_NUM_THREADS": "1"})
            (scratch / f"{arm}-{seed}.load").write_text(f"{run.other_cores}\n")
            if run.returncode:
                sys.exit(f"{arm} seed {seed} failed (exit {run.returncode}):\n{run.log[-2000:]}")
            print(f"{arm} seed {seed}: {run.wall_s:.0f}s", flush=True)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, todo))
        results = {arm: [summarize_run(scratch / f"{arm}-{seed}")
                         for seed in SEEDS[:args.seeds]] for arm in arms}
        load = [float(p.read_text()) for a, s in todo
                if (p := scratch / f"{a}-{s}.load").is_file()]
        every = [r for runs in results.values() for r in runs]
        levels = [*loss_levels(every, count=3), *deep_levels(results)]
        levels = sorted(set(levels), reverse=True)
        plot(results, PLOT)
        markdown = render(results, levels, load, args.seeds, args.budget_tokens, command)
        print(markdown)
        compare = [scratch / f"{arm}-{SEEDS[0]}" for arm in arms]
        compare_page(compare, scratch)
        if not args.no_write:
            write_section("bench_steps_to_target", "## Steps to a target loss: AdamW or Muon, "
                          "fixed or auto batch, cosine or WSD (tiny recipe, tinyshakespeare)\n\n"
                          + markdown)


if __name__ == "__main__":
    main()
