"""The training benchmark's GPU rows: `bigbatch train` against the plain PyTorch loop and the
Hugging Face `Trainer` on one CUDA device, bf16, tokens/s and MFU against the chip's bf16 matmul
peak measured in the same run; table into the bench_gpu section of BENCHMARKS.md.

    python benchmarks/bench_gpu.py            # what `make gpu-check` runs (where a GPU is)

Same model, batch, steps and timing rules as benchmarks/bench_train.py (the default recipe's
shape, and GPT-2's 50K vocabulary), each run a fresh child process, interleaved in rounds with
the order reversed every other round; each ratio is the median of the per-round ratios. Without
a CUDA device it says so and writes nothing (exit 0), so `make gpu-check` runs to its end on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_train import (
    Run,
    Shape,
    Variant,
    baseline_argv,
    bigbatch_argv,
    bigbatch_tokens_per_s,
    command_line,
    json_tokens_per_s,
)
from common import run_child, today, write_section

SECTION = "bench_gpu"


def cuda_matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 8192, reps: int = 20) -> float:
    """Best FLOP/s of an n x n x n matmul on random data, timed by CUDA events."""
    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        end.synchronize()
        best = max(best, 2 * n**3 / (start.elapsed_time(end) / 1000))
    return best


def make_variants(args: argparse.Namespace) -> list[Variant]:
    default = Shape.default_recipe()
    wide = dataclasses.replace(default, vocab_size=50304)
    variants = []
    for suffix, shape in (("", default), ("_50k", wide)):
        run = Run(shape, args.global_tokens, args.warmup_steps, args.steps)
        tag = " (vocab 50K)" if suffix else ""
        variants += [
            Variant(f"bigbatch{suffix}", f"bigbatch bf16{tag}", "bf16",
                    bigbatch_argv("bf16", "--train.device=cuda"), bigbatch_tokens_per_s, run),
            Variant(f"plain{suffix}", f"plain loop bf16{tag}", "bf16",
                    baseline_argv("plain_loop.py", "bf16", "--data=corpus", "--device=cuda"),
                    json_tokens_per_s, run),
            Variant(f"hf{suffix}", f"HF Trainer bf16{tag}", "bf16",
                    baseline_argv("hf_trainer_loop.py", "bf16", "--device=cuda"),
                    json_tokens_per_s, run),
        ]
    # The fused loss kernel on the GPU, side by side with the standard loss `auto` picks there
    # (engine/fused_loss.py: `auto` fuses on a CPU only).
    variants.append(Variant("bigbatch_fused_50k", "bigbatch bf16, fused loss (vocab 50K)", "bf16",
                            bigbatch_argv("bf16", "--train.device=cuda",
                                          "--model.loss_kernel=fused"),
                            bigbatch_tokens_per_s, Run(wide, args.global_tokens,
                                                       args.warmup_steps, args.steps)))
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--global-tokens", type=int, default=65536)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: skipped: no CUDA device (torch "
              f"{torch.__version__}{', built without CUDA' if torch.version.cuda is None else ''})")
        return 0
    began = time.time()
    peak = cuda_matmul_peak()
    variants = make_variants(args)
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        for round_index in range(args.rounds):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for variant in order:
                out = scratch / f"{variant.key}-r{round_index}"
                child = run_child(variant.argv(variant.run, out), scratch / f"{out.name}.log")
                if child.returncode != 0:
                    sys.exit(f"{variant.label} failed (exit {child.returncode}):\n"
                             f"{child.log[-3000:]}")
                speed = variant.tokens_per_s(variant.run, child, out)
                variant.speeds.append(speed)
                print(f"  round {round_index + 1} {variant.label}: {speed:,.0f} tokens/s",
                      flush=True)
    by_key = {v.key: v for v in variants}
    name = torch.cuda.get_device_name()
    lines = [
        "## GPU training throughput (bench_gpu)", "",
        f"`{command_line()}`, {today()}, on {name} (torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}); {time.time() - began:.0f} s. bf16 matmul peak measured here: "
        f"{peak / 1e12:.0f} TFLOP/s (8192^3 on random data, CUDA events). MFU = tokens/s x "
        "FLOPs per token (bench_train's count) / that peak. Global batch "
        f"{args.global_tokens:,} tokens, {args.steps} timed steps after {args.warmup_steps}, "
        f"{args.rounds} rounds.", "",
        "| run | tokens/s (median) | MFU |", "|---|---:|---:|",
    ]
    for v in variants:
        speed = statistics.median(v.speeds)
        mfu = speed * v.run.shape.flops_per_token() / peak
        lines.append(f"| {v.label} | {speed:,.0f} | {100 * mfu:.1f}% |")
    lines += ["", "| ratio (median of per-round ratios) | value |", "|---|---:|"]
    for suffix, tag in (("", ""), ("_50k", ", vocab 50K")):
        for other, label in (("plain", "plain loop"), ("hf", "HF Trainer")):
            ratios = [a / b for a, b in zip(by_key[f"bigbatch{suffix}"].speeds,
                                            by_key[f"{other}{suffix}"].speeds, strict=True)]
            lines.append(f"| bigbatch / {label}, bf16{tag} | {statistics.median(ratios):.2f}x |")
    fused = [a / b for a, b in zip(by_key["bigbatch_fused_50k"].speeds, by_key["bigbatch_50k"].speeds,
                                   strict=True)]
    lines.append(f"| bigbatch fused loss / standard loss, vocab 50K | {statistics.median(fused):.2f}x |")
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        write_section(SECTION, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
