"""The micro-batch search: the fastest micro-batch that fits the budget; the global batch never
changes.

Candidates are the divisors of the per-rank batch (in sequences), so the number of micro-steps
stays whole. For each memory tactic in turn (as configured; then activation checkpointing; then
checkpointing and chunked loss, when `model.activation_checkpointing = "auto"`):

    predict every candidate's peak with the default calibration
    probe the smallest candidate (a fresh process), fit the overhead to it
    a few times: probe the largest candidate predicted to fit, refit both constants to all
        measurements so far (the scale now has spread), predict again
    choose the fastest measured candidate whose peak fits (measured and predicted, plus
        PEAK_HEADROOM); within SPEED_TIE of the fastest, the largest

If no tactic fits, a one-line UsageError names the smallest memory that would do. Under several
ranks each rank searches, then all take the smallest micro-batch and the strongest tactic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from bigbatch.errors import UsageError
from bigbatch.plan.budget import format_bytes
from bigbatch.plan.memory import (
    DEFAULT_OVERHEAD,
    Calibration,
    ModelDims,
    Setup,
    allreduce_bytes_per_step,
    estimate_memory,
)
from bigbatch.plan.probe import ProbeRequest, ProbeResult, fit_calibration, run_probe

DEFAULT_CHUNK_TOKENS = 1024  # chunked-loss slice when the planner turns it on
NUM_FAST_PROBES = 3          # largest fitting candidates measured, for the fit and for speed
# A plan keeps this fraction of its peak free below the budget. The same configuration's peak RSS
# varies between fresh processes: under the tuned allocator the heap's layout depends on which
# thread freed what first (bench_memory measured each setting 3 times: a spread of up to ~8%
# either side at the wide fp32 size, ~2% at small ones), and a run does a little the probes
# do not (metrics, TensorBoard, the report's child). 5% covers the spread measured on all but
# the worst case; the budget itself is already a fraction of free memory (budget.py).
PEAK_HEADROOM = 0.05
# Probe speeds of one micro-batch vary by a few % between processes; among candidates within
# this fraction of the fastest, the largest micro-batch is chosen (fewer, larger matmuls).
SPEED_TIE = 0.03


@dataclass(frozen=True)
class Tactic:
    checkpointing: str      # none | all | every_n
    checkpoint_every: int
    loss_chunk_tokens: int


@dataclass
class Candidate:
    micro_batch_size: int
    predicted_bytes: int
    measured_bytes: int | None = None
    tokens_per_s: float | None = None
    note: str = ""

    def need_bytes(self) -> int:
        """The larger of prediction and measurement, plus the headroom (PEAK_HEADROOM)."""
        return round(max(self.predicted_bytes, self.measured_bytes or 0) * (1 + PEAK_HEADROOM))

    def fits(self, budget: int) -> bool:
        return self.need_bytes() <= budget and not self.note


@dataclass
class MemoryPlan:
    micro_batch_size: int
    num_micro_steps: int
    activation_checkpointing: str
    checkpoint_every: int
    loss_chunk_tokens: int
    predicted_peak_bytes: int
    budget_bytes: int
    components: dict[str, int]
    calibration: dict
    global_tokens: int
    seq_len: int
    world_size: int
    sequences_per_rank: int
    sharding: str
    allreduce_bytes_per_step: int
    device: str
    candidates: list[dict] = field(default_factory=list)
    tactics_tried: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


ProbeFn = Callable[[ProbeRequest], ProbeResult]


def tactics_for(mode: str, every: int, chunk_tokens: int, seq_len: int) -> list[Tactic]:
    if mode != "auto":
        return [Tactic(mode, every, chunk_tokens)]
    # A quarter sequence, so chunking still helps at micro-batch 1.
    chunk = chunk_tokens or max(1, min(DEFAULT_CHUNK_TOKENS, seq_len // 4))
    tactics = [Tactic("none", every, chunk_tokens), Tactic("all", every, chunk_tokens),
               Tactic("all", every, chunk)]
    return list(dict.fromkeys(tactics))  # chunking already on: the last two are one


def _setup(base: Setup, tactic: Tactic, micro_batch_size: int) -> Setup:
    return replace(base, micro_batch_size=micro_batch_size, checkpointing=tactic.checkpointing,
                   checkpoint_every=tactic.checkpoint_every,
                   loss_chunk_tokens=tactic.loss_chunk_tokens)


def _describe(tactic: Tactic) -> str:
    chunk = f"loss chunks of {tactic.loss_chunk_tokens}" if tactic.loss_chunk_tokens else \
        "whole loss"
    return f"checkpointing {tactic.checkpointing}, {chunk}"


def search_tactic(dims: ModelDims, base: Setup, tactic: Tactic, sizes: list[int], budget: int,
                  device: str, allocator: str, probe: ProbeFn
                  ) -> tuple[list[Candidate], Calibration]:
    """Predict, probe, fit and measure one tactic's candidates (see the module docstring)."""
    default = Calibration(DEFAULT_OVERHEAD["cuda" if device.startswith("cuda") else "cpu"])
    calibration = default

    def predict(size: int) -> int:
        return estimate_memory(dims, _setup(base, tactic, size), calibration).total

    candidates = {size: Candidate(size, predict(size)) for size in sizes}
    per_rank = max(sizes)

    def measure(size: int) -> None:
        request = ProbeRequest(dims, size, num_micro_steps=max(2, min(4, per_rank // size)),
                               precision=base.precision, checkpointing=tactic.checkpointing,
                               checkpoint_every=tactic.checkpoint_every,
                               loss_chunk_tokens=tactic.loss_chunk_tokens,
                               loss_kernel=base.loss_kernel, device=device, allocator=allocator)
        result = probe(request)
        found = candidates[size]
        found.measured_bytes, found.tokens_per_s = result.peak_bytes, result.tokens_per_s
        found.note = "" if result.ok else result.error

    def refit() -> None:
        nonlocal calibration
        points = [(_setup(base, tactic, c.micro_batch_size), c.measured_bytes)
                  for c in candidates.values() if c.measured_bytes is not None]
        calibration = fit_calibration(dims, points, default)
        for found in candidates.values():
            found.predicted_bytes = predict(found.micro_batch_size)

    if not candidates[sizes[0]].fits(budget):
        return [candidates[s] for s in sizes], calibration
    measure(sizes[0])  # the smallest fixes the overhead
    refit()
    for _ in range(NUM_FAST_PROBES):
        # The largest candidate predicted to fit and not yet measured: its measurement both
        # refines the fit's scale and gives the speed of a likely winner.
        untried = [s for s in sizes if candidates[s].fits(budget)
                   and candidates[s].measured_bytes is None and not candidates[s].note]
        if not untried:
            break
        measure(untried[-1])
        refit()
    return [candidates[s] for s in sizes], calibration


def choose_micro_batch(dims: ModelDims, base: Setup, *, global_tokens: int, mode: str,
                       checkpoint_every: int, loss_chunk_tokens: int, budget: int,
                       device: str = "cpu", allocator: str = "tuned",
                       probe: ProbeFn = run_probe) -> MemoryPlan:
    """The plan for one rank; `base` carries precision, optimizer, world size, sharding, data."""
    tokens_per_rank_row = dims.seq_len * base.world_size
    if global_tokens % tokens_per_rank_row:
        raise UsageError(f"batch.global_tokens = {global_tokens} is not a multiple of data.seq_len "
                         f"x world size = {tokens_per_rank_row}: the per-rank batch must be whole "
                         "sequences")
    per_rank = global_tokens // tokens_per_rank_row
    sizes = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    tried = []
    smallest_need = None
    for tactic in tactics_for(mode, checkpoint_every, loss_chunk_tokens, dims.seq_len):
        tried.append(_describe(tactic))
        candidates, calibration = search_tactic(dims, base, tactic, sizes, budget, device,
                                                allocator, probe)
        measured = [c for c in candidates if c.fits(budget) and c.tokens_per_s is not None]
        need = candidates[0].need_bytes()
        smallest_need = need if smallest_need is None else min(smallest_need, need)
        if not measured:
            continue
        fastest = max(c.tokens_per_s for c in measured)
        best = max((c for c in measured if c.tokens_per_s >= (1 - SPEED_TIE) * fastest),
                   key=lambda c: c.micro_batch_size)
        setup = _setup(base, tactic, best.micro_batch_size)
        estimate = estimate_memory(dims, setup, calibration)
        return MemoryPlan(
            micro_batch_size=best.micro_batch_size,
            num_micro_steps=per_rank // best.micro_batch_size,
            activation_checkpointing=tactic.checkpointing,
            checkpoint_every=tactic.checkpoint_every,
            loss_chunk_tokens=tactic.loss_chunk_tokens,
            predicted_peak_bytes=estimate.total, budget_bytes=budget,
            components=estimate.components(), calibration=asdict(calibration),
            global_tokens=global_tokens, seq_len=dims.seq_len, world_size=base.world_size,
            sequences_per_rank=per_rank, sharding=base.sharding,
            allreduce_bytes_per_step=allreduce_bytes_per_step(dims, base.world_size,
                                                              base.sharding),
            device=device, candidates=[asdict(c) for c in candidates], tactics_tried=tried)
    raise UsageError(f"batch.memory_budget = {format_bytes(budget)} is too small: the smallest "
                     f"plan (micro-batch 1, {tried[-1]}) needs about "
                     f"{format_bytes(smallest_need)} ({smallest_need} bytes, with "
                     f"{100 * PEAK_HEADROOM:.0f}% headroom); raise the budget or "
                     "shrink the model or data.seq_len")


def agree_across_ranks(plan: MemoryPlan, tactics: list[Tactic]) -> MemoryPlan:
    """Every rank takes the smallest micro-batch and the strongest tactic any rank chose."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return plan
    index = tactics.index(Tactic(plan.activation_checkpointing, plan.checkpoint_every,
                                 plan.loss_chunk_tokens))
    mine = torch.tensor([plan.micro_batch_size, -index], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.to(plan.device)  # this rank's own GPU (cuda:LOCAL_RANK), never cuda:0
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)
    size, tactic = int(mine[0]), tactics[-int(mine[1])]
    return replace(plan, micro_batch_size=size, num_micro_steps=plan.sequences_per_rank // size,
                   activation_checkpointing=tactic.checkpointing,
                   checkpoint_every=tactic.checkpoint_every,
                   loss_chunk_tokens=tactic.loss_chunk_tokens)
