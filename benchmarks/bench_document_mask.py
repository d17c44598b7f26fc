"""Document masking's cost and effect on the default recipe: `bigbatch train` (configs/default.toml,
shortened to `--steps` full batches) with `--data.document_mask` false and true; table into
BENCHMARKS.md.

    python benchmarks/bench_document_mask.py               # 2 rounds of 4 full batches each way
    python benchmarks/bench_document_mask.py --steps 30    # the whole default run (slow)

Both runs see the same windows in the same order (same seed) and as many tokens, so their losses
compare at equal tokens: the validation loss at the end (each scored as it trains: masked
windows for the masked model) and the mean training loss over the last quarter of the steps.
tokens/s is the whole run's tokens over the timed steps' seconds (the first step, which warms
up, left out). Each run is a fresh child; the rounds alternate the order; a run during which
other processes used more than `--max-other-cores` of the CPU is marked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_train import command_line
from common import machine_description, run_child, today, write_section

SECTION = "bench_document_mask"


def result(out: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    timed = steps[1:]
    tail = steps[-max(1, len(steps) // 4):]
    return {"tokens_per_s": sum(r["tokens_per_s"] * r["step_seconds"] for r in timed)
            / sum(r["step_seconds"] for r in timed),
            "val_loss": [r["val_loss"] for r in rows if "val_loss" in r][-1],
            "train_loss": statistics.mean(r["loss"] for r in tail),
            "tokens": steps[-1]["tokens"], "steps": len(steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="train.max_steps (full batches)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-other-cores", type=float, default=0.5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-docmask-") as scratch:
        for round_index in range(args.rounds):
            order = (False, True) if round_index % 2 == 0 else (True, False)
            for masked in order:
                out = Path(scratch) / f"r{round_index}-{masked}"
                child = run_child([sys.executable, "-m", "bigbatch", "train", "--out", str(out),
                                   f"--train.max_steps={args.steps}",
                                   f"--data.document_mask={str(masked).lower()}"],
                                  Path(scratch) / f"{out.name}.log")
                if child.returncode != 0:
                    sys.exit(f"document_mask={masked} failed:\n{child.log[-3000:]}")
                row = {**result(out), "other_cores": child.other_cores, "wall_s": child.wall_s}
                runs[masked].append(row)
                print(f"round {round_index + 1} document_mask={masked}: {row}", flush=True)
    markdown = render(args, runs)
    print(markdown)
    if not args.no_write:  # the default recipe trains on the GPU where there is one
        write_section(SECTION + ("_cuda" if gpu_name() else ""), markdown)
    return 0


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


def render(args: argparse.Namespace, runs: dict[bool, list[dict[str, float]]]) -> str:
    ratios = [on["tokens_per_s"] / off["tokens_per_s"]
              for off, on in zip(runs[False], runs[True], strict=True)]
    worst = max(r["other_cores"] for rows in runs.values() for r in rows)
    lines = [
        "## Document masking: cost and effect on the default recipe",
        "",
        f"`{command_line()}` ({today()}; {gpu_name() or 'CPU'}; {machine_description()}). "
        "`bigbatch train` with no "
        f"arguments but `--train.max_steps={args.steps}` and `--data.document_mask`, "
        f"{args.rounds} round(s), order alternated; other processes used up to {worst:.2f} "
        f"cores during a run{' (busy: tokens/s are noisy)' if worst > args.max_other_cores else ''}.",
        "",
        "| data.document_mask | tokens | tokens/s (each round) | val loss (each round) | "
        "train loss, last quarter |",
        "|---|---|---|---|---|",
    ]
    for masked, rows in runs.items():
        lines.append(f"| {str(masked).lower()} | {rows[0]['tokens']:,} | "
                     + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rows) + " | "
                     + ", ".join(f"{r['val_loss']:.4f}" for r in rows) + " | "
                     + ", ".join(f"{r['train_loss']:.4f}" for r in rows) + " |")
    lines += ["", f"tokens/s, masked / unmasked, median of the rounds: "
                  f"{statistics.median(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
