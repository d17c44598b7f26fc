"""Worker for tests/unit/optim/test_muon.py's DDP test, launched on 2 CPU ranks by
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/muon_dist_worker.py OUT.pt`.

Each rank takes its half of dist_worker.make_problem(2)'s global batch (ranks with very
different target counts) and runs two `train_step`s with `optim.name = "muon"` under DDP;
rank 0 saves the parameters. Newton-Schulz runs in fp32 (`FP32_NEWTON_SCHULZ`) so that the
comparison with one process is not bf16 rounding of a reduction-order ulp.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from bigbatch.config.sections import OptimConfig, PrecisionConfig
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import train_step
from bigbatch.optim import muon
from bigbatch.optim.registry import build_optimizer
from bigbatch.parallel.process_group import SINGLE_PROCESS, DistInfo, dist_info_from_env
from bigbatch.parallel.wrap import parallelize
from dist_worker import make_problem

MUON = OptimConfig(name="muon", lr=0.02, warmup_steps=0)
K = 2  # micro-steps per rank; one process takes 2K


def fp32_newton_schulz(device: torch.device) -> torch.dtype:
    return torch.float32


def run(info: DistInfo, rank: int) -> dict[str, torch.Tensor]:
    """Two muon steps on this rank's share (all of it on one process): the caller makes
    `muon.newton_schulz_dtype` fp32_newton_schulz."""
    cpu = torch.device("cpu")
    model, batches = make_problem(K)
    wrapped = parallelize(model, "ddp", cpu, info)
    optimizer = build_optimizer(model, MUON, cpu)
    share = len(batches) // info.world_size
    mine = batches[rank * share:(rank + 1) * share]
    precision = make_precision(PrecisionConfig(dtype="fp32"), cpu)
    for _ in range(2):
        train_step(wrapped, optimizer, mine, precision=precision, clip_norm=1.0, dist=info)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def one_process() -> dict[str, torch.Tensor]:
    return run(SINGLE_PROCESS, 0)


def main(out_path: str) -> None:
    muon.newton_schulz_dtype = fp32_newton_schulz  # this process only (the oracle patches)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = run(dist_info_from_env(), rank)
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
