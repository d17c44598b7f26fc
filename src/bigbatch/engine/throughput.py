"""What a model costs and what the hardware can do: training FLOPs per token, the hardware's
name, and a quick measurement of its matmul peak (for MFU in run_info.json and the report)."""

from __future__ import annotations

import os
import platform
import re
import time
from pathlib import Path

import torch

# Budget of the start-up matmul peak measurement: short enough not to matter to a run, long
# enough for a few large matmuls. It is a lower bound of the hardware's peak, so an MFU against
# it is an upper bound; the report says so, and benchmarks/ measure the peak properly.
PEAK_SECONDS = 0.25


def flops_per_token(n_layer: int, d_model: int, vocab_size: int, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward; PaLM / nanoGPT convention, full
    attention counted, biases, norms and the embedding lookup not):
    6 * (12 * L * d^2 + d * V) + 12 * L * d * T."""
    return 6 * (12 * n_layer * d_model**2 + d_model * vocab_size) + 12 * n_layer * d_model * seq_len


def describe_hardware(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{world_size} x {name}" if world_size > 1 else name
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        found = re.search(r"^model name\s*:\s*(.*)$", cpuinfo.read_text(), re.M)
        model = found.group(1).strip() if found else model
    ranks = f", {world_size} ranks" if world_size > 1 else ""
    return (f"{model} ({os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"
            f"{ranks})")


def quick_matmul_peak(device: torch.device, dtype_name: str) -> float:
    """Best FLOP/s of a square matmul in the run's compute dtype within PEAK_SECONDS."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # fp16 runs compute in fp32 on CPU
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up: kernel selection and first touch of the output
    best, deadline = 0.0, time.perf_counter() + PEAK_SECONDS
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        began = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host sync: timing a kernel
        best = max(best, 2 * n**3 / (time.perf_counter() - began))
    if device.type == "cuda":  # the logged peak memory is the run's, not these matrices'
        del a, b
        torch.cuda.reset_peak_memory_stats(device)
    return best
