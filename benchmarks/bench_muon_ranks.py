"""Muon's optimizer step over 2 CPU ranks (gloo): what orthogonalising sharded matrices costs.

Under DDP every rank runs the whole step of one process (each orthogonalises every matrix; no
communication in the step), so the one-process row is also DDP's per-rank cost. Under FSDP2
each Muon matrix's update is gathered from its shards, orthogonalised and scattered back
(optim/muon.py); the rows compare every rank orthogonalising every matrix (`spread=False`)
with one rank per matrix, the matrices dealt round the ranks (bigbatch's default). Only the
Muon part is timed (its matrices: the default recipe's GPT, n_layer 4, d_model 384, vocab 8192,
seq 256), with fixed random gradients, 1 thread per process, Newton-Schulz in the dtype bigbatch
picks here (bf16 where the CPU multiplies it natively) and in fp32; variants interleaved in
rounds, the median of each reported.

    python benchmarks/bench_muon_ranks.py [--rounds 3] [--steps 2] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, loadavg, machine_description, today, write_section  # noqa: E402

SECTION = "bench_muon_ranks"
NPROC = 2
SHAPE = dict(vocab_size=8192, seq_len=256, n_layer=4, n_head=6, d_model=384)


def muon_part(world_size: int, ns_dtype):
    """The default GPT (sharded over `world_size` ranks when > 1) and its Muon part, every
    parameter given a fixed random gradient (the same on every rank, then sharded)."""
    import torch

    from bigbatch.config.sections import OptimConfig
    from bigbatch.model.gpt import GPT, GPTShape
    from bigbatch.optim.registry import build_optimizer
    from bigbatch.parallel.wrap import shard

    torch.manual_seed(0)
    model = GPT(GPTShape(**SHAPE))
    if world_size > 1:
        from torch.distributed.tensor import distribute_tensor

        shard(model, torch.device("cpu"), world_size)
    for p in model.parameters():
        grad = torch.randn(p.shape) * 1e-3
        p.grad = (distribute_tensor(grad, p.device_mesh, p.placements)
                  if world_size > 1 else grad)
    muon = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu")).optimizers[0]
    muon.ns_dtype = ns_dtype
    return muon


def seconds_per_step(muon, warmup: int, steps: int, barrier=lambda: None) -> float:
    for _ in range(warmup):
        muon.step()
    barrier()
    began = time.perf_counter()
    for _ in range(steps):
        muon.step()
    barrier()
    return (time.perf_counter() - began) / steps


def variants() -> list[tuple[str, object, bool]]:
    """(label, Newton-Schulz dtype, spread) for every timed variant."""
    import torch

    from bigbatch.optim.muon import newton_schulz_dtype

    picked = newton_schulz_dtype(torch.device("cpu"))
    dtypes = [picked] + [d for d in (torch.bfloat16, torch.float32) if d != picked]
    return [(f"{str(d).removeprefix('torch.')} NS", d, spread) for d in dtypes
            for spread in (False, True)]


def worker(out_path: str, rounds: int, warmup: int, steps: int) -> None:
    """On every rank under torchrun; rank 0 writes {label: [seconds per step, ...]}."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    times: dict[str, list[float]] = {}
    for round_index in range(rounds):
        order = variants() if round_index % 2 == 0 else variants()[::-1]
        for label, dtype, spread in order:
            muon = muon_part(dist.get_world_size(), dtype)
            muon.spread = spread
            name = f"{label}, {'one rank per matrix' if spread else 'every rank every matrix'}"
            times.setdefault(name, []).append(seconds_per_step(muon, warmup, steps, dist.barrier))
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def one_process(rounds: int, warmup: int, steps: int) -> dict[str, list[float]]:
    import torch

    torch.set_num_threads(1)
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for label, dtype, spread in variants():
            if spread:  # one process has no ranks to spread over
                continue
            times.setdefault(label, []).append(seconds_per_step(muon_part(1, dtype), warmup,
                                                                steps))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.rounds, args.warmup, args.steps)
        return 0
    began = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "times.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={NPROC}", str(Path(__file__).resolve()),
                               "--worker", str(out), "--rounds", str(args.rounds),
                               "--warmup", str(args.warmup), "--steps", str(args.steps)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            return 1
        ranks = json.loads(out.read_text())
    single = one_process(args.rounds, args.warmup, args.steps)
    rows = [f"| 1 process (= each DDP rank) | {label} | {1000 * statistics.median(t):.1f} |"
            for label, t in single.items()]
    rows += [f"| FSDP, {NPROC} ranks | {label} | {1000 * statistics.median(t):.1f} |"
             for label, t in ranks.items()]
    markdown = "\n".join([
        f"## Muon over ranks ({SECTION})", "",
        f"`python benchmarks/bench_muon_ranks.py`, {today()}, on {machine_description()}; "
        f"load average {loadavg():.1f} at the end; {time.time() - began:.0f} s. The Muon part's "
        f"optimizer step of the default recipe's GPT ({SHAPE}), 1 thread per process, "
        f"{args.rounds} rounds of {args.steps} steps after {args.warmup}, median. Under FSDP "
        "the step includes each matrix's all-gather and scatter (gloo).", "",
        "| setup | Newton-Schulz | ms per Muon step |", "|---|---|---:|", *rows])
    print(markdown)
    if not args.no_write:
        write_section(SECTION, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
