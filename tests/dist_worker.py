"""Worker for tests/integration/test_distributed.py, launched on 2 CPU ranks by
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT.pt`.

For each scenario (strategy, k micro-steps per rank, clipping) every rank takes its contiguous
share of the same global batch and runs one `train_step` with SGD(lr=1), so the parameter update
is exactly minus the (clipped) gradient. Rank 0 saves the full parameters before and after, the
step's reported loss and norm, and the gradient reductions counted per micro-step. The test
process rebuilds the same problem (`make_problem`) and runs it in one process as the oracle.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from bigbatch.batch import IGNORE_INDEX, MicroBatch
from bigbatch.config.sections import PrecisionConfig
from bigbatch.data.loader import eval_micro_batches
from bigbatch.engine.loop import evaluate
from bigbatch.engine.precision import make_precision
from bigbatch.engine.step import train_step
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.parallel.process_group import dist_info_from_env
from bigbatch.parallel.wrap import full_model_state_dict, parallelize
from bigbatch.tools.verify_distributed import ReductionCounter

SHAPE = GPTShape(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32)
MICRO_BATCH = 3
WORLD_SIZE = 2


@dataclass(frozen=True)
class Scenario:
    strategy: str
    k: int                  # micro-steps per rank; the oracle takes 2k in one process
    clip_norm: float = 0.0
    clip_value: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.strategy}-k{self.k}-norm{self.clip_norm:g}-value{self.clip_value:g}"


# Clip thresholds far below this model's gradients (norm ~1, elements up to ~0.1), so they act.
SCENARIOS = [Scenario("ddp", 1), Scenario("ddp", 4), Scenario("fsdp", 4, clip_norm=0.05),
             Scenario("fsdp", 2, clip_norm=0.05, clip_value=2e-3)]


def make_problem(k: int) -> tuple[GPT, list[MicroBatch]]:
    """The initial model and the global batch of 2k micro-batches, rank r's being [r*k, (r+1)*k).

    Rank 1's targets are mostly masked, so the ranks hold very different target counts and any
    per-rank normalisation would be visibly wrong.
    """
    torch.manual_seed(0)
    model = GPT(SHAPE)
    gen = torch.Generator().manual_seed(k)
    batches = []
    for i in range(WORLD_SIZE * k):
        tokens = torch.randint(0, SHAPE.vocab_size, (MICRO_BATCH, SHAPE.seq_len + 1), generator=gen)
        keep = 0.9 if i < k else 0.15 + 0.1 * (i % 3)
        targets = tokens[:, 1:].clone()
        targets[torch.rand(targets.shape, generator=gen) > keep] = IGNORE_INDEX
        batches.append(MicroBatch(tokens[:, :-1].contiguous(), targets))
    return model, batches


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def run(scenario: Scenario, rank: int) -> dict:
    info = dist_info_from_env()
    model, batches = make_problem(scenario.k)
    before = full_parameters(model)
    wrapped = parallelize(model, scenario.strategy, torch.device("cpu"), info)
    counter = ReductionCounter()
    counter.attach(wrapped)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    mine = batches[rank * scenario.k:(rank + 1) * scenario.k]
    stats = train_step(wrapped, optimizer, mine, precision=precision,
                       clip_norm=scenario.clip_norm, clip_value=scenario.clip_value, dist=info,
                       loss_sum_fn=counter.counting())
    result = {"before": before, "after": full_parameters(model), "loss": float(stats.loss),
              "grad_norm": float(stats.grad_norm), "num_targets": int(stats.num_targets),
              "calls": dict(counter.calls), "elements": dict(counter.elements),
              "noise": stats.noise}
    # What the run's end does with the trained model: evaluate, then gather the weights to save.
    result["val_loss"] = evaluate(wrapped, eval_batches(rank), precision, info,
                                  torch.device("cpu"))
    result["saved"] = full_model_state_dict(wrapped)
    return result


def eval_batches(rank: int, world_size: int = WORLD_SIZE) -> list[MicroBatch]:
    """An odd number (5) of validation micro-batches, so the ranks are dealt unequal shares."""
    tokens = np.random.default_rng(0).integers(0, SHAPE.vocab_size, 5 * 2 * SHAPE.seq_len + 1)
    return eval_micro_batches(tokens, eot_id=0, seq_len=SHAPE.seq_len,
                              eval_tokens=10 * SHAPE.seq_len, micro_batch_size=2, rank=rank,
                              world_size=world_size)


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {s.name: run(s, rank) for s in SCENARIOS}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()  # a rank that leaves while another destroys the group can hang it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
