"""Critical batch size on tinyshakespeare: `bigbatch sweep` with AdamW + sqrt and LAMB + linear.

For each optimizer, configs/sweep.toml (a 2-layer, d_model 128 GPT, vocab 512, 64-token
sequences) is trained at 7 global batches spanning 64x (128 to 8,192 tokens: this model's
critical batch is small) until the validation loss reaches the
target; the table gives steps and tokens to target, the fitted S_min, E_min and
B_crit = E_min / S_min of McCandlish et al.'s (S/S_min - 1)(E/E_min - 1) = 1, and the online noise
scale B_simple (gns_tokens) each run measured when it crossed the target.

The bar (the issue's): at 8x the smallest batch, where that is below the fitted B_crit, steps to
target <= 1/5 of the smallest batch's. Perfect scaling would give 1/8; the trade-off curve predicts
S(8b) / S(b) = (1 + B_crit / 8b) / (1 + B_crit / b).

    python benchmarks/bench_sweep.py [--no-write] [--batches A,B,...] [--target-loss X] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, loadavg, machine_description, run_child, today, write_section  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
BATCHES = "128,256,512,1024,2048,4096,8192"
TARGET = 3.8
MAX_TOKENS = 1_500_000
EVAL_EVERY_TOKENS = 4096  # evaluation every 32 steps at 128 tokens, every step from 4,096 up
SETUPS = {  # name: overrides of configs/sweep.toml (its lr is the peak at 2,048 tokens)
    "AdamW + sqrt": ["--optim.name=adamw", "--optim.lr_scaling=sqrt"],
    "LAMB + linear": ["--optim.name=lamb", "--optim.lr_scaling=linear", "--optim.lr=1e-2",
                      "--optim.weight_decay=0.01"],
}


def sweep_command(out: Path, overrides: list[str], batches: str, target: float) -> list[str]:
    return [sys.executable, "-m", "bigbatch", "sweep", "configs/sweep.toml",
            f"--data.path={DATA}", *overrides, "--batches", batches, "--target-loss", str(target),
            "--max-tokens", str(MAX_TOKENS), "--eval-every-tokens", str(EVAL_EVERY_TOKENS),
            "--out", str(out)]


def bar_line(result: dict) -> str:
    points = sorted((p for p in result["points"] if p["reached"]),
                    key=lambda p: p["batch_tokens"])
    smallest = points[0]
    eight = [p for p in points if p["batch_tokens"] == 8 * smallest["batch_tokens"]]
    if not eight:
        return "bar: no run at 8x the smallest batch reached the target"
    ratio = eight[0]["steps"] / smallest["steps"]
    b_crit, b = result.get("b_crit", 0.0), smallest["batch_tokens"]
    predicted = (1 + b_crit / (8 * b)) / (1 + b_crit / b)
    verdict = "met" if ratio <= 0.2 else "NOT met"
    return (f"Bar: steps at {8 * b:,} / steps at {b:,} = {ratio:.3f} (<= 0.2 wanted): "
            f"**{verdict}**; 8x the smallest batch is {'below' if 8 * b < b_crit else 'above'} "
            f"the fitted B_crit, and the fitted curve predicts {predicted:.3f} "
            "(perfect scaling: 0.125).")


def render(results: dict[str, dict], runs: dict, batches: str, target: float) -> str:
    lines = [f"Measured {today()} on {machine_description()}.", "",
             f"Command: `python benchmarks/bench_sweep.py` (each setup runs `bigbatch sweep "
             f"configs/sweep.toml --data.path=../shared/data/tinyshakespeare/input.txt "
             f"--batches {batches} --target-loss {target} --max-tokens {MAX_TOKENS} "
             f"--eval-every-tokens {EVAL_EVERY_TOKENS}` with the overrides named below, one "
             "thread: OMP_NUM_THREADS=1).", ""]
    for name, result in results.items():
        run = runs[name]
        reached = [p for p in result["points"] if p["reached"]]
        smallest = min(reached, key=lambda p: p["batch_tokens"])["steps"]
        lines += [f"### {name} (`{' '.join(SETUPS[name])}`)", "",
                  f"Wall time {run.wall_s / 60:.1f} min; other processes used "
                  f"{run.other_cores:.1f} cores on average meanwhile (load average before "
                  f"{run.loadavg_before:.1f}): the machine is shared, so times are not clean, "
                  "but steps and tokens to target do not depend on speed.", "",
                  "| global batch (tokens) | steps to target | tokens to target | "
                  "B_simple at target (tokens) | steps / steps at the smallest |",
                  "|---:|---:|---:|---:|---:|"]
        for p in result["points"]:
            if not p["reached"]:
                lines.append(f"| {p['batch_tokens']:,} | not reached (best "
                             f"{p['best_val_loss']:.3f}) | | | |")
                continue
            noise = f"{p['noise_tokens']:,.0f}" if p["noise_tokens"] else "-"
            lines.append(f"| {p['batch_tokens']:,} | {p['steps']:.1f} | {p['tokens']:,.0f} | "
                         f"{noise} | {p['steps'] / smallest:.3f} |")
        if "s_min" in result:
            measured = result["noise_scale_median"]
            measured = f"**{measured:,.0f} tokens**" if measured else "none"
            lines += ["", f"Fit: S_min = {result['s_min']:.1f} steps, E_min = "
                      f"{result['e_min']:,.0f} tokens, **B_crit = {result['b_crit']:,.0f} "
                      f"tokens**; online noise scale at the target (median over runs): "
                      f"{measured}.", "", bar_line(result), ""]
    lines += ["How to read this: the learning rate is tuned once, at the recipe's 2,048 tokens, and "
              "carried to the other batches by the scaling rule alone, while McCandlish et al. "
              "tune it per batch. Where the rule over- or under-shoots, steps to target show it "
              "(more steps at a larger batch, or tokens to target that fall as the batch grows), "
              "and the fit, which assumes a tuned lr at every batch, inherits that bias. "
              "B_simple per run is one moving average at one step, so it scatters; the median is "
              "the estimate to compare with B_crit."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    parser.add_argument("--batches", default=BATCHES)
    parser.add_argument("--target-loss", type=float, default=TARGET)
    parser.add_argument("--keep", type=Path, help="keep the sweeps' runs here (default: a "
                        "temporary directory)")
    args = parser.parse_args(argv)
    if not DATA.is_file():
        sys.exit(f"{DATA} is missing: the benchmark needs ../shared/data")
    results, runs = {}, {}
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        for name, overrides in SETUPS.items():
            out = Path(scratch) / name.replace(" ", "").replace("+", "-")
            print(f"{name}: load average before {loadavg():.1f}", flush=True)
            run = run_child(sweep_command(out, overrides, args.batches, args.target_loss),
                            Path(scratch) / f"{out.name}.log", env={"OMP_NUM_THREADS": "1"})
            print(run.log[-2500:], flush=True)
            if not (out / "sweep.json").is_file():
                sys.exit(f"{name}: the sweep wrote no sweep.json (exit {run.returncode})")
            results[name] = json.loads((out / "sweep.json").read_text())
            runs[name] = run
    markdown = "## Critical batch size (bench_sweep)\n\n" + render(results, runs, args.batches,
                                                                   args.target_loss)
    print(markdown)
    if not args.no_write:
        write_section("bench_sweep", markdown)


if __name__ == "__main__":
    main()
