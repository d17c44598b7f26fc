"""The probe: measure the peak memory and speed of real train_step calls, one fresh process each.

Each candidate runs in a child process (`python -m bigbatch.planning.probe REQUEST_JSON`) so that
its peak is its own: on CPU the peak resident set (VmHWM, which never goes down within a
process); on CUDA `torch.cuda.max_memory_allocated`, with out-of-memory caught here, in the
probe, never mid-run. The child builds the model exactly as training does (checkpointing,
chunked loss, precision, the configured optimizer, allocator setting), feeds random tokens
(memory does not depend on their values), and times steps after the first; by the second step
the optimizer state exists, so the peak is the steady state's.

`fit_calibration` then fits the memory model's two constants to the measurements by least
squares: measured - static = overhead + scale x growing bytes (see memory.py).

With `world_size` > 1 (CPU only: gloo) the probe runs under the real wrapper instead: torchrun
starts that many ranks, each wraps the model for `strategy` (DDP, or FSDP with its gradient
sync) and steps its own micro-batches, and the result is the largest rank's peak. The planner
probes one unwrapped process (search.py says why), except for FSDP on CPU, which it probes this
way; benchmarks/bench_memory.py measures the wrapper's terms with this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from bigbatch.planning.memory import Calibration, ModelDims, Setup, growing_bytes, static_bytes

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE",
                      "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ProbeRequest:
    dims: ModelDims
    micro_batch_size: int
    num_micro_steps: int = 2
    num_steps: int = 5
    # ...and more, up to max_steps, until the timed steps (all but the first) last this long:
    # a small model's step takes milliseconds, and one disturbed step would decide its speed.
    min_timed_seconds: float = 1.0
    max_steps: int = 30
    precision: str = "fp32"
    checkpointing: str = "none"
    checkpoint_every: int = 1
    loss_chunk_tokens: int = 0
    loss_kernel: str = "standard"  # resolved: standard | fused
    device: str = "cpu"
    allocator: str = "tuned"
    seed: int = 0
    model_source: str = "gpt"   # or a Hugging Face model (hf:/hf-config:), built for `task`
    task: str = "lm"
    trust_remote_code: bool = False
    world_size: int = 1         # > 1: under the wrapper, on that many gloo ranks (torchrun)
    strategy: str = "ddp"
    gradient_sync: str = "last"
    # The model's adapters, as [model] says them (adapter, lora_rank, ...); empty: none.
    adapter: tuple[tuple[str, Any], ...] = ()
    # The optimizer, as [optim] says it (name, lr, betas, ...): the probe builds it, so its
    # state is the run's. Empty: OptimConfig's defaults (AdamW).
    optimizer: tuple[tuple[str, Any], ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ProbeRequest:
        raw = json.loads(text)
        adapter = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in raw["adapter"])
        optimizer = tuple((k, v) for k, v in raw.get("optimizer", ()))
        return cls(**{**raw, "dims": ModelDims(**raw["dims"]), "adapter": adapter,
                      "optimizer": optimizer})


@dataclass(frozen=True)
class ProbeResult:
    micro_batch_size: int
    peak_bytes: int | None         # None when the candidate ran out of memory
    tokens_per_s: float | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.peak_bytes is not None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(request: ProbeRequest) -> ProbeResult:
    """Run in the child: build, step `num_steps` times, report the peak and the best speed."""
    if request.allocator == "tuned":
        from bigbatch.engine.allocator import tune_glibc_malloc

        tune_glibc_malloc()  # before the first big tensor, as train() does
    import torch

    from bigbatch.batch import MicroBatch
    from bigbatch.config.sections import OptimConfig, PrecisionConfig
    from bigbatch.engine.chunked_loss import make_loss_sum_fn
    from bigbatch.engine.loop import evaluate
    from bigbatch.engine.precision import make_precision
    from bigbatch.engine.step import train_step
    from bigbatch.model.checkpointing import apply_activation_checkpointing
    from bigbatch.model.gpt import GPT, GPTShape
    from bigbatch.optim.registry import build_optimizer
    from bigbatch.parallel.process_group import (
        SINGLE_PROCESS,
        dist_info_from_env,
        init_process_group,
    )
    from bigbatch.parallel.wrap import parallelize

    d = request.dims
    device = torch.device(request.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the rank's GPU is current, as in the run it plans
    info = dist_info_from_env() if request.world_size > 1 else SINGLE_PROCESS
    init_process_group(info, device)
    # What a run's process holds besides its steps, so the peak measured here is the run's:
    # TensorBoard's modules (metrics.py, rank 0) and the matmul-peak measurement at start
    # (engine/throughput.py), which leaves the math library's buffers behind (17 MiB together).
    import torch.utils.tensorboard  # noqa: F401

    from bigbatch.engine.throughput import quick_matmul_peak

    quick_matmul_peak(device, request.precision)
    torch.manual_seed(request.seed)
    shape = (request.micro_batch_size, d.seq_len)
    if request.model_source == "gpt":
        model = GPT(GPTShape(d.vocab_size, d.seq_len, d.n_layer, d.n_head, d.d_model),
                    attention=d.attention).to(device)
        apply_activation_checkpointing(model, request.checkpointing, request.checkpoint_every)
        loss_sum_fn = make_loss_sum_fn(request.loss_chunk_tokens, request.loss_kernel)
        make_batch = None
    else:
        from bigbatch.planning.hf_probe import hf_probe_setup

        model, loss_sum_fn, make_batch = hf_probe_setup(request, device)
    if request.adapter:  # frozen base, trainable adapters: as training builds it
        from bigbatch.config.sections import ModelConfig
        from bigbatch.model.adapters import apply_adapter
        from bigbatch.tasks import task_named

        model = apply_adapter(model, ModelConfig(**dict(request.adapter)),
                              task_named(request.task).model_head)
    model = parallelize(model, request.strategy, device, info, precision=request.precision,
                        fsdp_gradient_sync=request.gradient_sync)
    # After FSDP's sharding; the run's own optimizer, whose state is what the plan must hold.
    optimizer = build_optimizer(model, OptimConfig(**dict(request.optimizer)), device)
    precision = make_precision(PrecisionConfig(dtype=request.precision), device)

    def fresh_batches() -> list[MicroBatch]:
        # New tensors every step, as the loader makes them: the allocator sees the same churn.
        if make_batch is not None:
            return [make_batch() for _ in range(request.num_micro_steps)]
        return [MicroBatch(torch.randint(0, d.vocab_size, shape, device=device),
                           torch.randint(0, d.vocab_size, shape, device=device))
                for _ in range(request.num_micro_steps)]

    batches = fresh_batches()
    seconds = []
    try:
        # fit() evaluates before the first step and after the last, in micro-batches of the
        # same size; the allocator's heap after that mix is what a run sees, so probe it too.
        evaluate(model, batches[:1], precision, info, device, loss_sum_fn)
        # Ranks must take as many steps as each other: under the wrapper, num_steps exactly.
        while len(seconds) < request.num_steps or (
                not info.enabled and sum(seconds[1:]) < request.min_timed_seconds
                and len(seconds) < request.max_steps):
            started = time.perf_counter()
            batches = fresh_batches()
            stats = train_step(model, optimizer, batches, precision=precision, clip_norm=1.0,
                               dist=info, loss_sum_fn=loss_sum_fn)
            float(stats.loss)  # host sync, so the timing covers the whole step
            seconds.append(time.perf_counter() - started)
        evaluate(model, batches[:1], precision, info, device, loss_sum_fn)
    except torch.OutOfMemoryError as err:
        return ProbeResult(request.micro_batch_size, None, None, f"out of memory: {err}"[:200])
    tokens = request.micro_batch_size * d.seq_len * request.num_micro_steps
    best = min(seconds[1:] or seconds)  # the first step allocates and warms up
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else peak_rss_bytes())
    if info.enabled:  # the largest rank's peak (rank 0 also holds what only it does)
        import torch.distributed as dist

        largest = torch.tensor([peak], dtype=torch.int64, device=device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        peak = int(largest)
    return ProbeResult(request.micro_batch_size, int(peak), tokens / best)


def run_probe(request: ProbeRequest, timeout_s: float = 600.0) -> ProbeResult:
    """Measure one candidate in a fresh child process (a killed child means it did not fit)."""
    launcher = [sys.executable, "-m"]
    if request.world_size > 1:  # torchrun, whose own -m runs the module on every rank
        launcher += ["torch.distributed.run", "--standalone",
                     f"--nproc_per_node={request.world_size}", "-m"]
    command = [*launcher, "bigbatch.planning.probe", request.to_json()]
    # Under torchrun (rank 0 probing for a run's ranks) the run's own rendezvous and rank
    # variables must not reach the probe's group, which is a job of its own.
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES
           and not k.startswith("TORCHELASTIC_")}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                              env=env)
    except subprocess.TimeoutExpired:
        return ProbeResult(request.micro_batch_size, None, None, f"timed out after {timeout_s}s")
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        if done.returncode < 0:
            reason = f"killed by signal {-done.returncode} (out of memory?)"
        return ProbeResult(request.micro_batch_size, None, None, reason[:200])
    return ProbeResult(**json.loads(done.stdout.strip().splitlines()[-1]))


def fit_calibration(dims: ModelDims, points: list[tuple[Setup, int]],
                    default: Calibration) -> Calibration:
    """Least squares of measured - static = overhead + scale x growing bytes over the probes.

    With one point (or points of one size) only the overhead is fitted and the scale stays 1;
    a fit with a non-positive scale is rejected the same way (too little spread to trust).
    """
    xs = [growing_bytes(dims, setup) for setup, _ in points]
    ys = [measured - static_bytes(dims, setup) for setup, measured in points]
    if not points:
        return default
    label = f"fit of {len(points)} probe(s)"
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread > 0:
        scale = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
        if scale > 0:
            return Calibration(round(mean_y - scale * mean_x), scale, label)
    return Calibration(round(mean_y - mean_x), 1.0, label)


if __name__ == "__main__":
    from bigbatch.parallel.launch import exit_process
    from bigbatch.parallel.process_group import dist_info_from_env, shutdown

    result = measure(ProbeRequest.from_json(sys.argv[1]))
    info = dist_info_from_env()
    if info.is_main:
        print(json.dumps(asdict(result)), flush=True)
    shutdown(info)
    exit_process(0)
