"""The critical batch measured directly (`bigbatch cbs`) beside the online noise scale, tiny recipe.

configs/tiny.toml on tinyshakespeare (150 steps of 8,192 tokens, AdamW, no lr scaling) is trained
with a checkpoint every 25 steps, all kept; `bigbatch cbs` then branches from each of them at 1/8 to
2x the run's batch (the run's batch is above its online noise scale all along, so the branches
go below it), each branch resumed from the checkpoint with the lr held at the run's value there,
scaled by sqrt (the run has no rule). The table gives tokens to a common target per batch (as a
multiple of the fewest), the critical batch (20% more tokens than the fewest: Zhang et al. 2024)
and the run's own B_simple (gns_tokens) at that checkpoint. Tokens and losses do not depend on
the machine's load; wall times do, and the load is recorded.

    python benchmarks/bench_cbs.py [--no-write] [--run-dir DIR (reuse a run trained as below)]
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
TRAIN_FLAGS = ["--checkpoint.every_steps=25", "--checkpoint.keep=100"]
CBS_FLAGS = ["--factors", "0.125,0.25,0.5,1,2", "--branch-tokens", "65536",
             "--eval-every-tokens", "8192", "--max-checkpoints", "6", "--train.eval_tokens=16384"]
WEAK_NATS = 0.01  # a target this little below the start is within the evaluation's noise


def bigbatch(*args: str) -> list[str]:
    return [sys.executable, "-m", "bigbatch", *args]


def shown(args: list[str], run: str = "runs/tiny") -> str:
    return " ".join(["bigbatch", *args]).replace(str(DATA), "../shared/data/tinyshakespeare/"
                                                  "input.txt").replace("RUN", run)


def render(result: dict, train_note: str, cbs_run) -> str:
    factors = result["factors"]
    lines = [f"Measured {today()} on {machine_description()}.", "",
             "Commands: `" + shown(["train", "configs/tiny.toml", f"--data.path={DATA}",
                                    *TRAIN_FLAGS, "--out", "RUN"]) + "`, then `"
             + shown(["cbs", "RUN", *CBS_FLAGS]) + "` (`python benchmarks/bench_cbs.py` runs "
             "both).", "",
             f"{train_note} cbs: wall time {cbs_run.wall_s / 60:.1f} min, other processes used "
             f"{cbs_run.other_cores:.1f} cores on average meanwhile (load average before "
             f"{cbs_run.loadavg_before:.1f}): the machine is shared, so times are not clean; "
             "tokens and losses do not depend on speed.", "",
             f"Each branch: up to {result['branch_tokens']:,} tokens, evaluated every "
             f"{result['eval_every_tokens']:,} tokens on 16,384 validation tokens, lr = the "
             f"run's at the checkpoint x {result['lr_scaling']}(batch / 8,192); target = the "
             "smallest batch's loss after half its tokens. Cells: tokens to the target / the "
             "fewest of any batch (> 1.2: beyond the critical batch; - : not run, the search "
             "stops at the first batch beyond).", "",
             "| step | run tokens | loss at step -> target | " + " | ".join(
                 f"{round(f * 8192):,}" for f in factors) + " | critical batch | online "
             "B_simple | critical / B_simple |",
             "|---:|---:|---:|" + "---:|" * len(factors) + "---:|---:|---:|"]
    for p in result["points"]:
        by_batch = {b["batch_tokens"]: b for b in p["branches"]}
        cells = []
        for f in factors:
            b = by_batch.get(round(f * p["batch_tokens"]))
            cells.append("-" if b is None else "never" if not b["reached"] else
                         f"{b['tokens_to_target'] / p['reference_tokens']:.2f}")
        crit, noise = p["critical_batch_tokens"], p["noise_scale_tokens"]
        bracket = (f"{crit:,.0f} ({p['largest_within_tokens']:,}-"
                   f"{p['first_beyond_tokens']:,})" if p["first_beyond_tokens"]
                   else f">= {crit:,.0f}")
        weak = p["start_loss"] - p["target_loss"] < WEAK_NATS
        lines.append(f"| {p['step']} | {p['tokens']:,} | {p['start_loss']:.3f} -> "
                     f"{p['target_loss']:.3f}{' (weak)' if weak else ''} | " + " | ".join(cells) + f" | {bracket} | "
                     + (f"{noise:,.0f} | {crit / noise:.2g}x |" if noise else "- | - |"))
    lines += ["", f"(weak): the smallest branch lowered the loss by less than {WEAK_NATS} nats "
              "on its way to the target (late in the run the cosine schedule has the lr near its "
              "floor), too little to tell batches apart: that row is not evidence.",
              "", "How to read this: the critical batch is where tokens to the same loss reach "
              "1.2x the fewest, interpolated linearly in the batch between the last batch within "
              "and the first beyond (the bracket). Zhang et al.'s definition puts it at about "
              "0.2 B_noise + 1.2 x the smallest batch for McCandlish's E = E_min (1 + B / B_noise), "
              "so a critical batch near B_simple means B_simple understates B_noise by ~5x, as "
              "Merrill et al. (2025) find for Adam. Branches restore Adam's second moments from the "
              "run's batch, which slows the first steps of the largest branches; and each branch "
              "is short, so the numbers are per-checkpoint estimates, not a fit."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    parser.add_argument("--run-dir", type=Path, help="a run trained by this benchmark's train "
                        "command: measure it instead of training again")
    args = parser.parse_args(argv)
    if not DATA.is_file():
        sys.exit(f"{DATA} is missing: the benchmark needs ../shared/data")
    with tempfile.TemporaryDirectory() as temporary:
        run = args.run_dir or Path(temporary) / "tiny"
        if args.run_dir is None:
            print(f"train: load average before {loadavg():.1f}", flush=True)
            trained = run_child(bigbatch("train", "configs/tiny.toml", f"--data.path={DATA}",
                                         *TRAIN_FLAGS, "--out", str(run)),
                                Path(temporary) / "train.log")
            if trained.returncode:
                sys.exit(f"training failed (exit {trained.returncode}):\n{trained.log[-2000:]}")
            train_note = (f"Training: wall time {trained.wall_s / 60:.1f} min, other processes "
                          f"used {trained.other_cores:.1f} cores on average meanwhile.")
        else:
            info = json.loads((run / "run_info.json").read_text())
            seconds = sum(s["seconds"] for s in info["sessions"])
            train_note = (f"Training: an earlier run (`{info['command']}`), "
                          f"{seconds / 60:.1f} min of wall time under the same shared load.")
        print(f"cbs: load average before {loadavg():.1f}", flush=True)
        cbs_run = run_child(bigbatch("cbs", str(run), *CBS_FLAGS), Path(temporary) / "cbs.log")
        print(cbs_run.log[-4000:], flush=True)
        if cbs_run.returncode:
            sys.exit(f"cbs failed (exit {cbs_run.returncode})")
        result = json.loads((run / "cbs.json").read_text())
    markdown = ("## The critical batch by branching from checkpoints (bench_cbs)\n\n"
                + render(result, train_note, cbs_run))
    print(markdown)
    if not args.no_write:
        write_section("bench_cbs", markdown)


if __name__ == "__main__":
    main()
