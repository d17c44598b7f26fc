"""tokens/s, MFU and peak RSS of `bigbatch train` against a plain PyTorch loop, fp32 and bf16,
and of bigbatch's tuned allocator against the system one; table into BENCHMARKS.md.

Every run is a fresh child process: `bigbatch train` through its real CLI (tokens/s read from
metrics.jsonl over the timed steps: start-up, the evaluations and the final save excluded), and
`benchmarks/plain_loop.py`. The runs are interleaved in rounds (the order reversed every other
round, so a slow drift in the machine hurts both sides alike); each ratio is the median of the
per-round ratios. A run during which other processes used more than `--max-other-cores` of the
CPU is repeated, up to `--max-tries`, keeping the least disturbed attempt.

    python benchmarks/bench_train.py                       # what `make bench` runs
    python benchmarks/bench_train.py --rounds 1 --steps 2  # quicker, noisier

FLOPs per token (training = forward + backward = 3 x forward; PaLM / nanoGPT convention, full
attention counted, biases, norms and the embedding lookup not counted):

    6 * (12 * L * d^2  +  d * V)  +  12 * L * d * T
         blocks' matmuls  lm head     attention scores and values
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bigbatch.config import Config
from bigbatch.run_info import flops_per_token

# Run as a script, so this folder is on sys.path and `common` is found beside it.
from common import (
    ROOT,
    ChildRun,
    machine_description,
    matmul_peak,
    others_during,
    run_child,
    today,
    write_section,
)

SECTION = "bench_train"


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    seq_len: int
    micro_batch_size: int

    @classmethod
    def default_recipe(cls) -> Shape:
        cfg = Config()
        return cls(cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head, cfg.data.vocab_size,
                   cfg.data.seq_len, cfg.batch.micro_batch_size)

    def flops_per_token(self) -> int:
        return flops_per_token(self.n_layer, self.d_model, self.vocab_size, self.seq_len)

    def num_parameters(self) -> int:
        d = self.d_model
        per_block = 12 * d * d + 13 * d  # qkv, proj, fc, proj weights + biases; two LayerNorms
        return self.n_layer * per_block + (self.vocab_size + self.seq_len) * d + 2 * d


@dataclass
class Variant:
    """One kind of run. `argv` builds its command; `tokens_per_s` reads its result."""

    key: str
    label: str
    dtype: str
    argv: Callable[[argparse.Namespace, Shape, Path], list[str]]
    tokens_per_s: Callable[[argparse.Namespace, ChildRun, Path], float]
    runs: list[ChildRun] = field(default_factory=list)
    speeds: list[float] = field(default_factory=list)
    tries: list[int] = field(default_factory=list)


def bigbatch_argv(dtype: str, allocator: str) -> Callable[..., list[str]]:
    def argv(args: argparse.Namespace, shape: Shape, out: Path) -> list[str]:
        return [sys.executable, "-m", "bigbatch", "train", "--out", str(out),
                f"--model.n_layer={shape.n_layer}", f"--model.d_model={shape.d_model}",
                f"--model.n_head={shape.n_head}", f"--data.vocab_size={shape.vocab_size}",
                f"--data.seq_len={shape.seq_len}",
                f"--batch.micro_batch_size={shape.micro_batch_size}",
                f"--batch.global_tokens={args.global_tokens}",
                f"--train.max_steps={args.warmup_steps + args.steps}",
                "--train.eval_every=0", f"--train.eval_tokens={args.eval_tokens}",
                f"--precision.dtype={dtype}", f"--train.allocator={allocator}"]
    return argv


def bigbatch_tokens_per_s(args: argparse.Namespace, run: ChildRun, out: Path) -> float:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r and r["step"] > args.warmup_steps]
    if len(timed) != args.steps:
        raise RuntimeError(f"expected {args.steps} timed steps in {out}/metrics.jsonl, "
                           f"found {len(timed)}")
    # tokens_per_s * step_seconds = the step's tokens; total tokens / total time, not a mean
    # of rates, so one slow step weighs as much as its time.
    tokens = sum(r["tokens_per_s"] * r["step_seconds"] for r in timed)
    return tokens / sum(r["step_seconds"] for r in timed)


def plain_argv(dtype: str) -> Callable[..., list[str]]:
    def argv(args: argparse.Namespace, shape: Shape, out: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("plain_loop.py")),
                f"--dtype={dtype}", f"--layers={shape.n_layer}", f"--d-model={shape.d_model}",
                f"--heads={shape.n_head}", f"--vocab={shape.vocab_size}",
                f"--seq-len={shape.seq_len}", f"--micro-batch={shape.micro_batch_size}",
                f"--global-tokens={args.global_tokens}", f"--warmup-steps={args.warmup_steps}",
                f"--steps={args.steps}", "--data=corpus"]
    return argv


def plain_tokens_per_s(args: argparse.Namespace, run: ChildRun, out: Path) -> float:
    last_json = [line for line in run.log.splitlines() if line.startswith("{")][-1]
    return float(json.loads(last_json)["tokens_per_s"])


def make_variants() -> list[Variant]:
    return [
        Variant("bigbatch_fp32", "bigbatch fp32", "fp32", bigbatch_argv("fp32", "tuned"),
                bigbatch_tokens_per_s),
        Variant("plain_fp32", "plain loop fp32", "fp32", plain_argv("fp32"), plain_tokens_per_s),
        Variant("bigbatch_bf16", "bigbatch bf16", "bf16", bigbatch_argv("bf16", "tuned"),
                bigbatch_tokens_per_s),
        Variant("plain_bf16", "plain loop bf16", "bf16", plain_argv("bf16"), plain_tokens_per_s),
        Variant("bigbatch_bf16_system", "bigbatch bf16, `--train.allocator=system`", "bf16",
                bigbatch_argv("bf16", "system"), bigbatch_tokens_per_s),
    ]


# (label, numerator, denominator, bar): each ratio is the median of the per-round ratios.
COMPARISONS = [
    ("bigbatch / plain loop, fp32", "bigbatch_fp32", "plain_fp32", ""),
    ("bigbatch / plain loop, bf16", "bigbatch_bf16", "plain_bf16", "≥ 1.0 (issue 2)"),
    ("allocator: tuned / system (bigbatch bf16)", "bigbatch_bf16", "bigbatch_bf16_system", ""),
    ("bigbatch with system allocator / plain loop, bf16 (the engine alone; the plain loop also "
     "uses the system allocator)", "bigbatch_bf16_system", "plain_bf16", ""),
]


def measure(variant: Variant, args: argparse.Namespace, shape: Shape, scratch: Path,
            round_index: int) -> None:
    """Run `variant` until an undisturbed run or `--max-tries`; keep the least disturbed."""
    attempts: list[tuple[ChildRun, float]] = []
    for attempt in range(args.max_tries):
        out = scratch / f"{variant.key}-r{round_index}-t{attempt}"
        run = run_child(variant.argv(args, shape, out), scratch / f"{out.name}.log")
        if run.returncode != 0:
            sys.exit(f"{variant.label} failed (exit {run.returncode}):\n{run.log[-3000:]}")
        speed = variant.tokens_per_s(args, run, out)
        attempts.append((run, speed))
        print(f"  round {round_index + 1} {variant.label}: {speed:,.0f} tokens/s, peak RSS "
              f"{run.peak_rss_mib:,.0f} MiB, others used {run.other_cores:.2f} cores "
              f"(load avg {run.loadavg_before:.2f} before)", flush=True)
        if not run.disturbed(args.max_other_cores):
            break
    run, speed = min(attempts, key=lambda pair: pair[0].other_cores)
    variant.runs.append(run)
    variant.speeds.append(speed)
    variant.tries.append(len(attempts))


def measure_peaks(args: argparse.Namespace, peaks: dict[str, list[tuple[float, float]]]) -> None:
    """Append (FLOP/s, other processes' cores meanwhile) for each dtype."""
    for dtype in ("bf16", "fp32"):
        peaks[dtype].append(others_during(lambda d=dtype: matmul_peak(d, args.threads)))


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return shlex.join(["python", str(shown), *sys.argv[1:]])


def render(args: argparse.Namespace, shape: Shape, variants: dict[str, Variant],
           peak_samples: dict[str, list[tuple[float, float]]]) -> str:
    peaks = {d: max(flops for flops, _ in samples) for d, samples in peak_samples.items()}
    peak_load = max(others for samples in peak_samples.values() for _, others in samples)
    fpt = shape.flops_per_token()
    k = args.global_tokens // (shape.micro_batch_size * shape.seq_len)
    worst = max(r.other_cores for v in variants.values() for r in v.runs)
    noisy = worst > args.max_other_cores
    lines = [
        "## Training throughput: `bigbatch train` vs a plain PyTorch loop",
        "",
        *([f"**Measured while other processes used up to {worst:.2f} cores of "
           f"{os.cpu_count()}: indicative only. The ratios compare runs that shared the machine "
           "alike; the absolute tokens/s, the matmul peak and so the MFU are depressed and "
           "uncertain. A quiet run replaces this.**", ""] if noisy else []),
        f"Command: `{command_line()}` ({today()})  ",
        f"Machine: {machine_description()}  ",
        f"Model: the default recipe's GPT ({shape.n_layer} layers, d_model {shape.d_model}, "
        f"{shape.n_head} heads, vocab {shape.vocab_size}, seq {shape.seq_len}; "
        f"{shape.num_parameters() / 1e6:.2f}M parameters); micro-batch "
        f"{shape.micro_batch_size}, global batch {args.global_tokens:,} tokens = {k} "
        f"micro-steps; {args.warmup_steps} warm-up + {args.steps} timed optimizer steps per "
        f"run; {args.rounds} interleaved rounds; data: the default corpus's prepared tokens "
        "for both.  ",
        f"MFU: tokens/s x {fpt / 1e6:.2f} MFLOP/token (6·(12·L·d² + d·V) + 12·L·d·T) / the "
        f"matmul peak measured in this run on {args.threads} threads: bf16 "
        f"{peaks['bf16'] / 1e9:,.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s "
        "(square `torch.mm` of 1024 and 2048, best of the measurements before every round and "
        f"after the last; others used up to {peak_load:.2f} cores meanwhile).",
        "",
        "| run | tokens/s (median) | per round | MFU | peak RSS (MiB) | other processes' "
        "CPU (cores, worst kept run) | tries per round |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for v in variants.values():
        median = statistics.median(v.speeds)
        lines.append(
            f"| {v.label} | {median:,.0f} | {', '.join(f'{s:,.0f}' for s in v.speeds)} | "
            f"{100 * median * fpt / peaks[v.dtype]:.1f} % of {v.dtype} | "
            f"{max(r.peak_rss_mib for r in v.runs):,.0f} | "
            f"{max(r.other_cores for r in v.runs):.2f} | {', '.join(map(str, v.tries))} |")
    lines += ["", "| ratio (median of per-round ratios) | value | per round | bar |",
              "|---|---:|---|---|"]
    for label, num, den, bar in COMPARISONS:
        per_round = [a / b for a, b in zip(variants[num].speeds, variants[den].speeds,
                                           strict=True)]
        verdict = ""
        if bar:
            verdict = f"{bar}: {'met' if statistics.median(per_round) >= 1.0 else 'NOT met'}"
            verdict += " (on a disturbed run)" if noisy else ""
        lines.append(f"| {label} | {statistics.median(per_round):.2f}x | "
                     f"{', '.join(f'{r:.2f}' for r in per_round)} | {verdict} |")
    tuned, system = variants["bigbatch_bf16"], variants["bigbatch_bf16_system"]
    rss_ratio = (max(r.peak_rss_mib for r in tuned.runs)
                 / max(r.peak_rss_mib for r in system.runs))
    lines.append(f"| allocator: peak RSS tuned / system (bigbatch bf16) | {rss_ratio:.2f}x | | |")
    retried = sum(t - 1 for v in variants.values() for t in v.tries)
    lines += ["", f"Load: a run counts as disturbed when other processes used more than "
              f"{args.max_other_cores} cores during it (/proc/stat busy time minus the child's "
              f"and the harness's own CPU time, plus steal). {retried} run(s) were repeated; the "
              f"worst kept run saw {worst:.2f} cores used by others"
              + (" — these numbers are NOISY; rerun on a quiet machine." if noisy else ".")]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--global-tokens", type=int, default=16384)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=4096,
                        help="bigbatch's validation set (evaluations are not timed)")
    parser.add_argument("--max-tries", type=int, default=3)
    parser.add_argument("--max-other-cores", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=2, help="for the matmul peak")
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape = Shape.default_recipe()
    variants = {v.key: v for v in make_variants()}
    peaks: dict[str, list[tuple[float, float]]] = {"bf16": [], "fp32": []}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as scratch:
        for r in range(args.rounds):
            measure_peaks(args, peaks)
            order = list(variants.values())
            for variant in order if r % 2 == 0 else reversed(order):
                measure(variant, args, shape, Path(scratch), r)
    measure_peaks(args, peaks)
    table = render(args, shape, variants, peaks)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({
            "matmul_peaks_flops_and_other_cores": peaks, "flops_per_token": shape.flops_per_token(),
            "variants": {k: {"tokens_per_s": v.speeds, "tries": v.tries,
                             "peak_rss_mib": [r.peak_rss_mib for r in v.runs],
                             "other_cores": [r.other_cores for r in v.runs]}
                         for k, v in variants.items()}}, indent=1))
    if not args.no_write:
        write_section(SECTION, table)


if __name__ == "__main__":
    main()
