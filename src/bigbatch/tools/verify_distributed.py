"""`bigbatch verify --nproc N`: data parallelism checked against one process, on the user's recipe.

Every rank runs `train_step` on its shard of the first global batch under the recipe's strategy
(DDP or FSDP2), with an optimizer that only records the gradients it is handed. Rank 0 rebuilds
every rank's micro-batches (the loader is deterministic) and takes one forward/backward over all
of them at once: the single-process oracle over the same samples. Two checks:

1. the distributed gradients equal the oracle's (max over tensors of max|d - o| / max|o|);
2. no gradient reduction ran on a non-final micro-step, and the final one reduced every gradient
   element: a DDP communication hook wrapping allreduce (or, under FSDP, a custom reduce-scatter)
   counts the calls and elements, and a wrapped loss function tells it which micro-step is running.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

from bigbatch.batch import MicroBatch, split_batch
from bigbatch.config.sections import Config, PrecisionConfig
from bigbatch.data.corpus import prepare_corpus
from bigbatch.data.loader import TokenLoader
from bigbatch.engine.precision import make_precision
from bigbatch.engine.seeding import seed_everything
from bigbatch.engine.step import LossSumFn, lm_loss_sum, train_step
from bigbatch.parallel.process_group import DistInfo, barrier
from bigbatch.parallel.wrap import parallelize
from bigbatch.tasks.lm.wiring import build_model
from bigbatch.tools.verify import checkable_micro_batch, max_relative_error, reference_gradients


@dataclass
class ReductionCounter:
    """Gradient reductions (DDP all-reduce buckets, FSDP reduce-scatters) per micro-step (1-based)."""

    micro_step: int = 0
    calls: Counter = field(default_factory=Counter)
    elements: Counter = field(default_factory=Counter)

    def record(self, numel: int) -> None:
        self.calls[self.micro_step] += 1
        self.elements[self.micro_step] += numel

    def counting(self, loss_sum_fn: LossSumFn = lm_loss_sum) -> LossSumFn:
        """`loss_sum_fn` that first advances the micro-step: train_step calls it once per
        micro-step, before that micro-step's backward (where the reductions happen)."""
        def counted(model, batch):
            self.micro_step += 1
            return loss_sum_fn(model, batch)
        return counted

    def attach(self, model: nn.Module) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model.register_comm_hook(self, _counting_allreduce)
            return
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        if not units:
            raise ValueError("attach() needs a DDP or FSDP2 model")
        for unit in units:
            unit.set_custom_reduce_scatter(_CountingReduceScatter(self))


def _counting_allreduce(counter, bucket):  # no annotations: DDP checks them, and they are strings here
    counter.record(bucket.buffer().numel())
    return allreduce_hook(None, bucket)  # the default: all-reduce the bucket, divide by world size


class _CountingReduceScatter(DefaultReduceScatter):
    def __init__(self, counter: ReductionCounter) -> None:
        self.counter = counter

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.counter.record(input_tensor.numel())
        return super().__call__(output_tensor, input_tensor, group, op, async_op)


class FullGradientRecorder(torch.optim.Optimizer):
    """Records the full gradients it is handed (gathering FSDP's shards: a collective, so every
    rank steps it) by parameter name, and changes nothing."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__([p for _, p in named_params], defaults={})
        self.names = [name for name, _ in named_params]
        self.recorded: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ARG002 - the Optimizer interface
        params = self.param_groups[0]["params"]
        self.recorded = {name: _full(p.grad).clone() for name, p in zip(self.names, params,
                                                                          strict=True)}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()


@dataclass
class DistributedVerifyResult:
    strategy: str
    world_size: int
    dtype: str
    num_micro_steps: int             # per rank
    micro_batch_size: int
    target_counts: list[list[int]]   # [rank][micro-step]
    max_relative_error: float
    tolerance: float
    reductions: dict[int, int]       # micro-step -> gradient reduction calls
    reduced_elements: int            # elements reduced on the final micro-step, all calls
    gradient_elements: int           # what the final micro-step had to reduce (FSDP: padded)

    @property
    def early_reductions(self) -> int:
        return sum(n for step, n in self.reductions.items() if step < self.num_micro_steps)

    @property
    def passed(self) -> bool:
        return (self.max_relative_error <= self.tolerance and self.early_reductions == 0
                and self.reduced_elements >= self.gradient_elements > 0)


def rank_micro_batches(cfg: Config, tokens, eot_id: int, rank: int, world_size: int,
                       max_micro_steps: int, max_micro_batch: int) -> list[MicroBatch]:
    """Rank `rank`'s first-step micro-batches, cut to a size every rank (and the oracle) can hold."""
    cfg = checkable_micro_batch(cfg, world_size, max_micro_batch)
    split = split_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size,
                      world_size)
    loader = TokenLoader(tokens, eot_id, split, rank=rank, seed=cfg.train.seed)
    return [mb.first_rows(max_micro_batch)
            for mb in loader.next_step()[:max_micro_steps]]


def verify_distributed(cfg: Config, dist: DistInfo, max_micro_steps: int = 4,
                       max_micro_batch: int = 4, float64: bool = False
                       ) -> DistributedVerifyResult:
    """Run on every rank of an initialised process group; every rank returns rank 0's verdict."""
    if dist.is_main:  # rank 0 fills the cache, the others read it
        corpus = prepare_corpus(cfg.data)
    barrier(dist)
    if not dist.is_main:
        corpus = prepare_corpus(cfg.data)
    per_rank = [rank_micro_batches(cfg, corpus.train_tokens, corpus.eot_id, r, dist.world_size,
                                   max_micro_steps, max_micro_batch)
                for r in range(dist.world_size)]
    dtype = torch.float64 if float64 else torch.float32
    seed_everything(cfg.train.seed)
    model = build_model(cfg, corpus.vocab_size).to(dtype)
    oracle: dict[str, torch.Tensor] = {}
    if dist.is_main:  # the same initial weights, copied before any wrapping
        reference = copy.deepcopy(model)
        grads = reference_gradients(reference, [mb for mbs in per_rank for mb in mbs])
        oracle = dict(zip([name for name, _ in reference.named_parameters()], grads, strict=True))

    wrapped = parallelize(model, cfg.parallel.strategy, torch.device("cpu"), dist)
    named = [(name, p) for name, p in model.named_parameters()]  # FSDP swapped in DTensors
    counter = ReductionCounter()
    counter.attach(wrapped)
    recorder = FullGradientRecorder(named)
    precision = make_precision(PrecisionConfig(dtype="fp32"), torch.device("cpu"))
    mine = per_rank[dist.rank]
    train_step(wrapped, recorder, mine, precision=precision, dist=dist,
               loss_sum_fn=counter.counting())

    result = None
    if dist.is_main:
        names = list(oracle)
        error = max_relative_error([recorder.recorded[n] for n in names],
                                   [oracle[n] for n in names])
        # FSDP pads each parameter's first dimension to a multiple of the world size.
        padded = sum(p.numel() if cfg.parallel.strategy == "ddp" else
                     -(-p.shape[0] // dist.world_size) * dist.world_size * p.shape[1:].numel()
                     for _, p in named)
        result = DistributedVerifyResult(
            strategy=cfg.parallel.strategy, world_size=dist.world_size,
            dtype="float64" if float64 else "float32", num_micro_steps=len(mine),
            micro_batch_size=len(mine[0].inputs),
            target_counts=[[int(mb.num_targets()) for mb in mbs] for mbs in per_rank],
            max_relative_error=error, tolerance=1e-6 if float64 else 1e-4,
            reductions=dict(counter.calls), reduced_elements=counter.elements[len(mine)],
            gradient_elements=padded)
    box = [result]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def describe(result: DistributedVerifyResult) -> list[str]:
    early = result.early_reductions
    verdict = "OK" if result.passed else "FAILED"
    return [
        f"distributed check ({result.strategy}, {result.world_size} ranks, {result.dtype}): "
        f"{result.num_micro_steps} micro-steps of {result.micro_batch_size} sequences per rank "
        f"(target tokens per rank {result.target_counts}) vs one process over the same samples: "
        f"max relative error {result.max_relative_error:.2e} (tolerance "
        f"{result.tolerance:.0e}) {'OK' if result.max_relative_error <= result.tolerance else 'FAILED'}",
        f"gradient reductions per micro-step {dict(sorted(result.reductions.items()))}: "
        f"{early} before the last micro-step, {result.reduced_elements:,} of "
        f"{result.gradient_elements:,} gradient elements reduced on it {verdict}",
    ]


def main(cfg: Config, float64: bool) -> int:
    """`bigbatch verify` under torchrun: rank 0 also runs the one-process accumulation check."""
    from bigbatch.parallel.process_group import dist_info_from_env, init_process_group, shutdown
    from bigbatch.tools.verify import verify_recipe

    dist = dist_info_from_env()
    init_process_group(dist, torch.device("cpu"))
    passed = True
    if dist.is_main:
        single = verify_recipe(cfg, float64=float64)
        passed = single.passed
        print(f"accumulation check ({single.dtype}): max relative error "
              f"{single.max_relative_error:.2e} (tolerance {single.tolerance:.0e}) "
              f"{'OK' if single.passed else 'FAILED'}")
    result = verify_distributed(cfg, dist, float64=float64)
    if dist.is_main:
        print("\n".join(describe(result)), flush=True)
    box = [passed and result.passed]
    torch_dist.broadcast_object_list(box, src=0)
    shutdown(dist)
    return 0 if box[0] else 1
