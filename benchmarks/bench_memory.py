"""Memory planner benchmark: predicted vs measured peak memory, the auto choice's speed against
the best hand-picked micro-batch, and what checkpointing and chunked loss save and cost.

    .venv/bin/python benchmarks/bench_memory.py [--out BENCHMARKS.md]

Every measurement is a fresh process (the planner's own probe, bigbatch.planning.probe): peak RSS
(VmHWM) on CPU. "live" is the peak of live tensors in one forward+backward by torch.profiler,
which the formulas predict without any fitting. Writes its table between the markers
<!-- bench_memory:start --> and <!-- bench_memory:end --> of BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_memory.py --only-ranks   # the 2-rank DDP/FSDP rows alone

The 2-rank rows (their own markers, bench_memory_ranks) compare the planner's prediction for a
rank of a 2-rank DDP or FSDP run (as the planner makes it: fitted to one unwrapped process's
probes plus the memory model's wrapper terms, or for CPU FSDP to probes of the wrapper itself)
with the peak RSS of the largest rank of a real 2-rank gloo run of that wrapper (the probe
under torchrun).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bigbatch.batch import MicroBatch
from bigbatch.engine.chunked_loss import make_loss_sum_fn
from bigbatch.model.checkpointing import apply_activation_checkpointing
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.planning.memory import (
    DEFAULT_OVERHEAD,
    Calibration,
    ModelDims,
    Setup,
    estimate_memory,
)
from bigbatch.planning.probe import ProbeRequest, fit_calibration, run_probe
from bigbatch.planning.search import PEAK_HEADROOM, WRAPPED_PROBE_STEPS, choose_micro_batch

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench_memory:start -->", "<!-- bench_memory:end -->"
RANKS_START, RANKS_END = "<!-- bench_memory_ranks:start -->", "<!-- bench_memory_ranks:end -->"
MiB = 2**20
TINY = ModelDims(vocab_size=2048, seq_len=128, n_layer=2, d_model=128, n_head=4)
WIDE = ModelDims(vocab_size=8192, seq_len=256, n_layer=4, d_model=256, n_head=4)
# Parameters large against activations, so the wrapper's terms (4 P buckets; FSDP's shards) show.
DEEP = ModelDims(vocab_size=8192, seq_len=128, n_layer=8, d_model=512, n_head=8)


def live_peak(dims: ModelDims, setup: Setup) -> int:
    """Peak of live tensors allocated during one forward+backward (torch.profiler)."""
    model = GPT(GPTShape(dims.vocab_size, dims.seq_len, dims.n_layer, dims.n_head, dims.d_model))
    apply_activation_checkpointing(model, setup.checkpointing, setup.checkpoint_every)
    ids = torch.randint(0, dims.vocab_size, (setup.micro_batch_size, dims.seq_len))
    loss_fn = make_loss_sum_fn(setup.loss_chunk_tokens, setup.loss_kernel)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if setup.precision == "bf16"
                else contextlib.nullcontext())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        with autocast:
            loss = loss_fn(model, MicroBatch(ids, ids))
        loss.backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak


def request(dims: ModelDims, setup: Setup) -> ProbeRequest:
    return ProbeRequest(dims, setup.micro_batch_size, precision=setup.precision,
                        checkpointing=setup.checkpointing, loss_chunk_tokens=setup.loss_chunk_tokens,
                        loss_kernel=setup.loss_kernel)


def loss_label(setup: Setup) -> str:
    if setup.loss_kernel == "fused":
        return "fused"
    return f"chunks of {setup.loss_chunk_tokens}" if setup.loss_chunk_tokens else "whole"


REPEATS = 3  # fresh processes per measurement: a peak RSS varies between them (see below)


def median_peak(dims: ModelDims, setup: Setup) -> tuple[int, int, int]:
    """Median, min and max peak RSS of REPEATS fresh probe processes."""
    peaks = sorted(run_probe(request(dims, setup)).peak_bytes for _ in range(REPEATS))
    return peaks[len(peaks) // 2], peaks[0], peaks[-1]


def prediction_table() -> list[str]:
    cases = [("tiny", TINY, Setup(16)), ("tiny", TINY, Setup(16, precision="bf16")),
             ("tiny", TINY, Setup(16, checkpointing="all")),
             ("tiny", TINY, Setup(16, precision="bf16", checkpointing="all")),
             ("wide", WIDE, Setup(8, precision="bf16")),
             ("wide", WIDE, Setup(8, precision="bf16", checkpointing="all",
                                  loss_chunk_tokens=256)),
             ("wide", WIDE, Setup(8)),
             ("wide", WIDE, Setup(8, precision="bf16", loss_kernel="fused"))]
    rows = ["| model | prec | ckpt | loss | mb | live (profiler) | formula | err | "
            "fit from mb 1, mb/4, mb/2 -> predicted | measured RSS, median (range) | err |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, dims, setup in cases:
        points = []
        for small in sorted({1, setup.micro_batch_size // 4, setup.micro_batch_size // 2}):
            s = replace(setup, micro_batch_size=small)
            points.append((s, median_peak(dims, s)[0]))
        calibration = fit_calibration(dims, points, Calibration(DEFAULT_OVERHEAD["cpu"]))
        predicted = estimate_memory(dims, setup, calibration).total
        measured, low, high = median_peak(dims, setup)
        live = live_peak(dims, setup)
        parts = estimate_memory(dims, setup, Calibration(0))
        # What the profiler sees allocated in one forward+backward: no optimizer state yet
        formula = parts.autocast_copies + parts.activations + parts.logits_and_loss
        rows.append(f"| {name} | {setup.precision} | {setup.checkpointing} | "
                    f"{loss_label(setup)} | {setup.micro_batch_size} | "
                    f"{live / MiB:.1f} MiB | {formula / MiB:.1f} MiB | "
                    f"{100 * (formula - live) / live:+.1f}% | {predicted / MiB:.0f} MiB | "
                    f"{measured / MiB:.0f} MiB ({low / MiB:.0f}-{high / MiB:.0f}) | "
                    f"{100 * (predicted - measured) / measured:+.1f}% |")
        print(rows[-1], flush=True)
    return rows


def auto_vs_hand_table() -> list[str]:
    budget = 600 * MiB
    plan = choose_micro_batch(TINY, Setup(1, precision="bf16"), global_tokens=64 * 128,
                              mode="none", checkpoint_every=1, loss_chunk_tokens=0,
                              budget=budget)
    rows = ["| micro-batch | fits 600 MiB (measured) | with the planner's 5% headroom | "
            "tokens/s (hand-picked run) |", "|---|---|---|---|"]
    speeds, roomy = {}, {}
    for size in (1, 2, 4, 8, 16, 32, 64):
        result = run_probe(ProbeRequest(TINY, size, precision="bf16",
                                        num_micro_steps=64 // size, num_steps=3))
        fits = result.peak_bytes <= budget
        with_room = result.peak_bytes * (1 + PEAK_HEADROOM) <= budget
        if fits:
            speeds[size] = result.tokens_per_s
        if with_room:
            roomy[size] = result.tokens_per_s
        rows.append(f"| {size} | {'yes' if fits else 'no'} ({result.peak_bytes / MiB:.0f} MiB) "
                    f"| {'yes' if with_room else 'no'} | {result.tokens_per_s:,.0f} |")
        print(rows[-1], flush=True)
    rows.append("")
    for label, table in (("that fits", speeds), ("that fits with 5% headroom", roomy)):
        best = max(table, key=table.get)
        ratio = table.get(plan.micro_batch_size, speeds.get(plan.micro_batch_size, 0)) / table[best]
        rows.append(f"- auto chose micro-batch {plan.micro_batch_size} "
                    f"({plan.num_micro_steps} micro-steps); best hand-picked {label}: {best}; "
                    f"auto / best = **{ratio:.2f}x** (bar ≥ 0.9; same full-step runs as the "
                    "table)")
    return rows


def tactics_table() -> list[str]:
    rows = ["| tactic (wide, bf16, mb 8) | activations (formula) | logits+loss (formula) | "
            "measured RSS | tokens/s | memory saved | time paid |", "|---|---|---|---|---|---|---|"]
    base = None
    for label, ckpt, chunk, kernel in (("none", "none", 0, "standard"),
                                       ("checkpointing all", "all", 0, "standard"),
                                       ("chunked loss 256", "none", 256, "standard"),
                                       ("both", "all", 256, "standard"),
                                       ("fused loss kernel", "none", 0, "fused")):
        setup = Setup(8, precision="bf16", checkpointing=ckpt, loss_chunk_tokens=chunk,
                      loss_kernel=kernel)
        estimate = estimate_memory(WIDE, setup, Calibration(0))
        result = run_probe(request(WIDE, setup))
        if base is None:
            base = result
        saved = (base.peak_bytes - result.peak_bytes) / MiB
        paid = base.tokens_per_s / result.tokens_per_s - 1
        rows.append(f"| {label} | {estimate.activations / MiB:.0f} MiB | "
                    f"{estimate.logits_and_loss / MiB:.0f} MiB | {result.peak_bytes / MiB:.0f} MiB"
                    f" | {result.tokens_per_s:,.0f} | {saved:.0f} MiB | {100 * paid:+.0f}% |")
        print(rows[-1], flush=True)
    return rows


MEASURED_STEPS = 12  # a run's steady state: a gloo FSDP rank's peak levels off after ~5 steps


def fit_to_probes(precision: str, k: int, world: int = 1, strategy: str = "ddp") -> Calibration:
    """The planner's fit: probes at mb 1 and 2, one unwrapped process (world 1), or, as the
    planner probes FSDP on CPU, the wrapper itself on `world` gloo ranks."""
    points = []
    for small in (1, 2):
        setup = Setup(small, precision=precision, num_micro_steps=k, world_size=world,
                      strategy=strategy)
        steps = 3 if world == 1 else WRAPPED_PROBE_STEPS
        result = run_probe(ProbeRequest(DEEP, small, num_micro_steps=k, num_steps=steps,
                                        precision=precision, world_size=world,
                                        strategy=strategy))
        points.append((setup, result.peak_bytes))
    return fit_calibration(DEEP, points, Calibration(DEFAULT_OVERHEAD["cpu"]))


def ranks_table(repeats: int = REPEATS) -> list[str]:
    """Predicted (as the planner predicts) against measured 2-rank peaks, DEEP at mb 4."""
    rows = ["| prec | ranks | wrapper | probes fitted | predicted | measured RSS of the largest "
            "rank, median (range) | err | predicted wrapper terms against 1 rank |",
            "|---|---|---|---|---|---|---|---|"]
    size, k = 4, 2
    for precision in ("fp32", "bf16"):
        unwrapped = fit_to_probes(precision, k)
        wrapped = fit_to_probes(precision, k, world=2, strategy="fsdp")
        single = estimate_memory(DEEP, Setup(size, precision=precision, num_micro_steps=k),
                                 unwrapped)
        for world, strategy in ((1, "ddp"), (2, "ddp"), (2, "fsdp")):
            setup = Setup(size, precision=precision, world_size=world, strategy=strategy,
                          num_micro_steps=k)
            peaks = sorted(run_probe(ProbeRequest(
                DEEP, size, num_micro_steps=k, num_steps=MEASURED_STEPS, precision=precision,
                world_size=world, strategy=strategy)).peak_bytes for _ in range(repeats))
            measured = peaks[len(peaks) // 2]
            label = "-" if world == 1 else strategy.upper()
            fits = [("1 process", unwrapped)]
            if strategy == "fsdp":  # the planner's (wrapped), then what one process would say
                fits = [("2-rank FSDP (the planner's)", wrapped), ("1 process", unwrapped)]
            for how, calibration in fits:
                estimate = estimate_memory(DEEP, setup, calibration)
                terms = ", ".join(f"{name} {(v - single.components()[name]) / MiB:+.0f} MiB"
                                  for name, v in estimate.components().items()
                                  if v != single.components()[name]) or "-"
                rows.append(f"| {precision} | {world} | {label} | {how} | "
                            f"{estimate.total / MiB:.0f} MiB | {measured / MiB:.0f} MiB "
                            f"({peaks[0] / MiB:.0f}-{peaks[-1] / MiB:.0f}) | "
                            f"{100 * (estimate.total - measured) / measured:+.1f}% | {terms} |")
                print(rows[-1], flush=True)
    return rows


def ranks_body(started: float) -> list[str]:
    body = ["### 2 ranks: DDP and FSDP, predicted against measured", "",
            f"`.venv/bin/python benchmarks/bench_memory.py --only-ranks`, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, 2-core CPU, 2 gloo ranks on it (load average "
            f"{os.getloadavg()[0]:.1f} at the end). deep = V8192 T128 L8 C512 (29.4M "
            "parameters), micro-batch 4, 2 micro-steps. predicted: what the planner predicts "
            "for `batch.micro_batch_size = \"auto\"`: its fit to probes at mb 1 and 2, of one "
            "unwrapped process for 1 rank and DDP (plus the memory model's wrapper terms, never "
            f"fitted), and of FSDP itself on 2 gloo ranks ({WRAPPED_PROBE_STEPS} steps) for CPU "
            "FSDP; the FSDP rows also show what a one-process fit would say. measured: the "
            f"largest rank's peak RSS in a real 2-rank run of that wrapper ({MEASURED_STEPS} "
            f"steps; the median of {REPEATS} runs). FSDP: bf16 gathers bf16 "
            "(MixedPrecisionPolicy); gradient sync last, so the unsharded gradients (4 P) are "
            "held as one rank holds them.", ""]
    body += ranks_table()
    body += ["", "Why CPU FSDP is probed under the wrapper: its live tensors are what the memory "
             "model says (the profiler's peak of one step's allocations on a rank's training "
             "thread was 312 MiB against 291 MiB for one unwrapped rank, fp32), but under the "
             "tuned allocator (heap only, never trimmed) each rank's heap keeps the holes the "
             "per-step all-gather and reduce-scatter buffers leave, and its peak RSS rises over "
             "the first ~5 steps to some 400 MiB above them. With large blocks mmapped instead "
             "(`MALLOC_MMAP_THRESHOLD_=131072`, system allocator) the same 2-rank fp32 FSDP "
             "rank peaks at 819 MiB against 1,483 MiB (8 steps), so it is the heap's retention, "
             "not a tensor; the fit to wrapped probes takes it into its overhead. On CUDA the "
             "probe's max_memory_allocated counts live tensors only.", "",
             f"({time.time() - started:.0f}s.)"]
    return body


def write_section(path: Path, body: list[str], start: str = START, end: str = END) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = "\n".join([start, *body, end])
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--only-ranks", action="store_true", help="only the 2-rank rows")
    args = parser.parse_args()
    started = time.time()
    if args.only_ranks:
        write_section(args.out, ranks_body(started), RANKS_START, RANKS_END)
        print(f"wrote {args.out}", file=sys.stderr)
        return
    body = ["## Memory planner (bench_memory)", "",
            f"`.venv/bin/python benchmarks/bench_memory.py`, {time.strftime('%Y-%m-%d %H:%M')}, "
            f"on a 2-core CPU (load average {os.getloadavg()[0]:.1f} at the start, LOAD_END at "
            "the end; above 0.5, tokens/s are disturbed by other processes). Live-tensor peaks are exact and repeatable; peak "
            "RSS under the tuned allocator (glibc heap, never trimmed) depends on the "
            "allocation history (which thread frees first), so the same configuration spreads "
            "between processes (ranges below): the planner keeps 5% of a plan's peak as "
            "headroom for that. Checkpointing can show a higher RSS than none although it "
            "allocates less. With `train.allocator=system` RSS follows live memory. "
            f"torch {torch.__version__}, default allocator setting (tuned). tiny = "
            "V2048 T128 L2 C128; wide = V8192 T256 L4 C256.", "",
            "### Predicted vs measured peak", "",
            "live/formula: the formulas of planning/memory.py (no fitting) against the profiler's "
            "peak of live tensors in one forward+backward (parameters excluded). predicted: "
            "the planner's least-squares fit to probes at mb 1, mb/4 and mb/2 (as its search "
            "refines with larger candidates), extrapolated to mb; measured: peak RSS over 5 "
            "steps (more, up to 30, until 1 s of steps is timed) at that micro-batch. Every peak is the median of REPEATS fresh processes "
            "(the range is shown for the target).", ""]
    body += prediction_table()
    body += ["", "### auto against the best hand-picked micro-batch (tiny, bf16, 8,192-token "
             "batch, 600 MiB budget)", ""]
    body += auto_vs_hand_table()
    body += ["", "### Activation checkpointing and chunked loss: memory saved, time paid", ""]
    body += tactics_table()
    body += ["", f"({time.time() - started:.0f}s in all.)"]
    body = [line.replace("LOAD_END", f"{os.getloadavg()[0]:.1f}").replace("REPEATS", str(REPEATS))
            for line in body]
    write_section(args.out, body)
    write_section(args.out, ranks_body(time.time()), RANKS_START, RANKS_END)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
