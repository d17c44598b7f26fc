"""Worker for tests/integration/test_muon_ranks.py, launched on 2 CPU ranks by
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/muon_dist_worker.py OUT.pt`.

Each rank takes its half of dist_worker.make_problem(2)'s global batch (ranks with very
different target counts) and runs `STEPS` `train_step`s with `optim.name = "muon"`, under DDP
and then under FSDP2 (each matrix orthogonalised by one rank, then by every rank); rank 0 saves each strategy's losses and full parameters. The GPT has
d_model = 15, so FSDP's dim-0 shards of every Muon matrix are uneven over 2 ranks (qkv: 45 rows,
23 + 22). Newton-Schulz runs in fp32 (`fp32_newton_schulz`) so that the comparison with one
process is not bf16 rounding of a reduction-order ulp.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from bigbatch.config.sections import OptimConfig, PrecisionConfig
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import train_step
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.optim import muon
from bigbatch.optim.registry import build_optimizer
from bigbatch.parallel.process_group import SINGLE_PROCESS, DistInfo, dist_info_from_env
from bigbatch.parallel.wrap import parallelize
from dist_worker import SHAPE, full_parameters, make_problem

MUON = OptimConfig(name="muon", lr=0.02, warmup_steps=0)
ODD_SHAPE = GPTShape(vocab_size=SHAPE.vocab_size, seq_len=SHAPE.seq_len, n_layer=2, n_head=3,
                     d_model=15)
K = 2  # micro-steps per rank; one process takes 2K
STEPS = 3
# "fsdp-repeated": every rank orthogonalises every matrix (Muon's spread=False) instead of one.
STRATEGIES = ("ddp", "fsdp", "fsdp-repeated")


def fp32_newton_schulz(device: torch.device) -> torch.dtype:
    return torch.float32


def run(info: DistInfo, rank: int, strategy: str = "ddp") -> dict:
    """`STEPS` muon steps on this rank's share (all of it on one process): the caller makes
    `muon.newton_schulz_dtype` fp32_newton_schulz."""
    cpu = torch.device("cpu")
    _, batches = make_problem(K)
    torch.manual_seed(0)
    model = GPT(ODD_SHAPE)
    wrapped = parallelize(model, strategy.removesuffix("-repeated"), cpu, info)
    optimizer = build_optimizer(model, MUON, cpu)
    optimizer.optimizers[0].spread = not strategy.endswith("-repeated")
    share = len(batches) // info.world_size
    mine = batches[rank * share:(rank + 1) * share]
    precision = make_precision(PrecisionConfig(dtype="fp32"), cpu)
    losses = [float(train_step(wrapped, optimizer, mine, precision=precision, clip_norm=1.0,
                               dist=info).loss) for _ in range(STEPS)]
    muon_part = optimizer.optimizers[0]
    buffer = muon_part.state[model.blocks[0].attn.qkv.weight]["momentum_buffer"]
    local = buffer.to_local() if hasattr(buffer, "to_local") else buffer
    return {"losses": losses, "params": full_parameters(model),
            "qkv_buffer": (type(buffer).__name__, tuple(buffer.shape), tuple(local.shape))}


def one_process() -> dict:
    return run(SINGLE_PROCESS, 0)


def main(out_path: str) -> None:
    muon.newton_schulz_dtype = fp32_newton_schulz  # this process only (the oracle patches)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {strategy: run(dist_info_from_env(), rank, strategy) for strategy in STRATEGIES}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
