"""One optimizer step of each optimizer against AdamW's: the cost Muon adds (Newton-Schulz on
every hidden matrix) per step, on the GPT shapes users train. Table into BENCHMARKS.md.

    python benchmarks/bench_optim_step.py                    # CPU: the default recipe's GPT
    python benchmarks/bench_optim_step.py --device cuda      # + GPT-2 small (what gpu-check runs)

Each variant builds the optimizer bigbatch builds (optim/registry.py) over the model's trainable
parameters with fixed random gradients, steps `--warmup` times, then times `--steps` steps
(CUDA: events after a synchronize); variants are interleaved in rounds with the order flipped every
other round, and each ratio is the median of the per-round ratios against AdamW. On a CPU, Muon's
Newton-Schulz runs in fp32 where bf16 is not native (optim/muon.py): the `muon, bf16 NS` row is
then torch's own bf16 iteration, emulated, for comparison. A step is independent of the batch, so
its share of a training step falls as the batch grows (bigbatch's point); the share column puts it
against the measured forward and backward of one global batch of the given tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch

from bench_train import command_line
from bigbatch.config.sections import OptimConfig
from bigbatch.devices import native_bf16
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.optim import muon as muon_module
from bigbatch.optim.registry import build_optimizer
from common import loadavg, own_cpu_seconds, read_cpu_times, today, write_section

SECTION = "bench_optim_step"
SHAPES = {  # name -> (GPTShape, tokens per optimizer step the share column assumes)
    "default recipe (10M)": (GPTShape(vocab_size=8192, seq_len=256, n_layer=4, n_head=6,
                                      d_model=384), 65536),
    "GPT-2 small (124M)": (GPTShape(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12,
                                    d_model=768), 524288),
}


@dataclasses.dataclass
class Variant:
    label: str
    optimizer: str
    ns_dtype: torch.dtype | None = None  # None: what bigbatch picks for the device
    times: list[float] = dataclasses.field(default_factory=list)


def build(model: torch.nn.Module, variant: Variant, device: torch.device):
    optimizer = build_optimizer(model, OptimConfig(name=variant.optimizer), device)
    if variant.ns_dtype is not None:
        for part in getattr(optimizer, "optimizers", [optimizer]):
            if isinstance(part, muon_module.Muon):
                part.ns_dtype = variant.ns_dtype
    return optimizer


def time_steps(optimizer, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per optimizer step."""
    for _ in range(warmup):
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            optimizer.step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / steps
    began = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - began) / steps


def train_step_seconds(model: GPT, shape: GPTShape, device: torch.device, tokens: int) -> float:
    """Seconds for the forward and backward of `tokens` tokens, measured: a few micro-batches
    of `rows` sequences (bf16 autocast on a GPU or a CPU with native bf16, else fp32), scaled to
    `tokens`. The share's denominator: what the optimizer step is added to."""
    rows = 8 if device.type == "cuda" else 2
    dtype = (torch.bfloat16 if device.type == "cuda" or native_bf16(device) else torch.float32)
    ids = torch.randint(0, shape.vocab_size, (rows, shape.seq_len + 1), device=device)

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()

    forward_backward()
    repeats = 5 if device.type == "cuda" else 2
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(repeats):
        forward_backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_token = (time.perf_counter() - began) / (repeats * rows * shape.seq_len)
    return per_token * tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-other-cores", type=float, default=0.3,
                        help="redo a CPU round during which other processes used more")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_optim_step: skipped: no CUDA device")
        return 0
    device = torch.device(args.device)
    shapes = SHAPES if device.type == "cuda" else dict(list(SHAPES.items())[:1])
    rows = []
    began = time.time()
    disturbance: list[float] = []  # other processes' CPU use (cores) over each kept round
    redone = 0
    for shape_name, (shape, tokens) in shapes.items():
        torch.manual_seed(0)
        model = GPT(shape).to(device)
        fwd_bwd = train_step_seconds(model, shape, device, tokens)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        variants = [Variant("adamw", "adamw"), Variant("muon", "muon")]
        if device.type == "cpu":
            other = torch.float32 if native_bf16(device) else torch.bfloat16
            variants.append(Variant(f"muon, {'fp32' if other == torch.float32 else 'bf16'} NS",
                                    "muon", other))
        for round_index in range(args.rounds):
            order = variants if round_index % 2 == 0 else variants[::-1]
            for _attempt in range(args.tries):  # a round disturbed by other processes is redone
                before, own = read_cpu_times(), own_cpu_seconds()
                started = time.perf_counter()
                times = {}
                for variant in order:
                    optimizer = build(model, variant, device)
                    times[variant.label] = time_steps(optimizer, device, args.warmup, args.steps)
                    del optimizer
                after = read_cpu_times()
                others = ((after.busy - before.busy) - (own_cpu_seconds() - own)
                          + (after.steal - before.steal)) / (time.perf_counter() - started)
                if device.type == "cuda" or others <= args.max_other_cores:
                    break
                redone += 1
            disturbance.append(others)
            for variant in variants:
                variant.times.append(times[variant.label])
        adamw = variants[0]
        for variant in variants:
            ratio = statistics.median(t / a for t, a in zip(variant.times, adamw.times,
                                                            strict=True))
            step_ms = 1000 * statistics.median(variant.times)
            rows.append(f"| {shape_name} | {variant.label} | {step_ms:.2f} | {ratio:.2f}x | "
                        f"{100 * statistics.median(variant.times) / fwd_bwd:.2f}% of "
                        f"{tokens:,} tokens |")
            print(rows[-1], flush=True)
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"CPU ({cpu_model()}, native bf16: {native_bf16(device)}, "
                  f"{torch.get_num_threads()} threads, load average {loadavg():.1f} at the end)")
    lines = [
        f"## Optimizer step time against AdamW ({SECTION}, {device.type})", "",
        f"`{command_line()}`, {today()}, on {where}, torch {torch.__version__}; "
        f"{time.time() - began:.0f} s. {args.rounds} rounds of {args.steps} steps after "
        f"{args.warmup}, interleaved; other processes used {min(disturbance):.2f}-"
        f"{max(disturbance):.2f} cores during the kept rounds ({redone} round(s) redone for "
        f"using more than {args.max_other_cores}); ratio = median of per-round ratios to AdamW. "
        "Share = the optimizer step's time against the forward + backward of that many tokens "
        "(one global batch), measured here on micro-batches of the model in bf16 autocast "
        "(fp32 on a CPU without native bf16).", "",
        "| model | optimizer | ms per step (median) | vs AdamW | share of a training step |",
        "|---|---|---:|---:|---:|", *rows,
    ]
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        write_section(f"{SECTION}_{device.type}", markdown)
    return 0


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
