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

If no tactic fits, a one-line UsageError names the smallest memory that would do, or, when the
memory model says a candidate fits but its probe failed, what the probes said (out of memory,
or the error). Under several ranks each rank searches, then all take the smallest micro-batch
and the strongest tactic.

The wrapper. A probe is one unwrapped process (on CUDA, one GPU: a rank's own), so what DDP and
FSDP add or take away (DDP's buckets; FSDP's shards, gathered units, unsharded gradients) is
never measured there: the fit is made against the setup the probe really ran (one rank, its own
micro-steps), so those terms cannot be absorbed into the fitted overhead, and they come back
from the memory model (memory.py) when a candidate is predicted for the real world size. A
measured peak is compared with the budget after the same correction (`Candidate.wrapper_bytes`).
The exception is FSDP on CPU (`wrapped_probe`, decided by the planner): there the probe runs under
the wrapper itself, on world-size gloo ranks, and the fit is made against the wrapped setup. Under
the tuned allocator (heap only, never trimmed) a gloo FSDP rank's heap keeps the holes that the
per-step all-gather and reduce-scatter buffers leave, and its peak RSS levels off after about 5
steps some 400 MiB (29M parameters, fp32) above its live tensors: no term of the memory model, and
no unwrapped probe, holds that (bench_memory, "2 ranks"). So those probes take WRAPPED_PROBE_STEPS
steps, past where the peak levels off, and the fitted overhead takes the retention in.
Under FSDP with `parallel.fsdp_gradient_sync = "auto"` each memory tactic is tried with "last"
(one reduce-scatter per step, unsharded gradients) before "every" (sharded gradients, a
reduce-scatter per micro-step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from bigbatch.batch import divisors, sequences_per_rank
from bigbatch.config.units import format_bytes
from bigbatch.errors import UsageError
from bigbatch.planning.memory import (
    DEFAULT_OVERHEAD,
    Calibration,
    ModelDims,
    Setup,
    allreduce_bytes_per_step,
    estimate_memory,
    static_bytes,
)
from bigbatch.planning.probe import ProbeRequest, ProbeResult, fit_calibration, run_probe

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
# Steps a probe under the wrapper takes (all ranks the same number): a gloo FSDP rank's peak RSS
# rises over the first ~5 steps under the tuned allocator (module docstring).
WRAPPED_PROBE_STEPS = 8


@dataclass(frozen=True)
class Tactic:
    checkpointing: str      # none | all | every_n
    checkpoint_every: int
    loss_chunk_tokens: int
    gradient_sync: str = "last"  # FSDP: last | every (parallel.fsdp_gradient_sync)


@dataclass
class Candidate:
    micro_batch_size: int
    predicted_bytes: int
    measured_bytes: int | None = None
    tokens_per_s: float | None = None
    note: str = ""
    # What the wrapper adds to (DDP) or takes from (FSDP) the unwrapped probe's peak, by the
    # memory model: the measured peak a rank of the real run would see is measured + this.
    wrapper_bytes: int = 0

    def need_bytes(self) -> int:
        """The larger of prediction and (wrapper-corrected) measurement, plus PEAK_HEADROOM."""
        measured = self.measured_bytes + self.wrapper_bytes if self.measured_bytes else 0
        return round(max(self.predicted_bytes, measured) * (1 + PEAK_HEADROOM))

    def fits(self, budget: int) -> bool:
        return self.need_bytes() <= budget and not self.note


@dataclass
class MemoryPlan:
    """The planner's choice (micro-batch, checkpointing, chunked loss) and what it measured."""

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
    strategy: str
    allreduce_bytes_per_step: int
    device: str
    candidates: list[dict] = field(default_factory=list)
    tactics_tried: list[str] = field(default_factory=list)
    fsdp_gradient_sync: str = "last"
    # The same micro-batch's components on one unwrapped rank: what the wrapper changes.
    one_rank_components: dict[str, int] = field(default_factory=dict)
    probed_under_wrapper: bool = False  # probes ran the wrapper on world_size ranks (CPU FSDP)

    def to_dict(self) -> dict:
        return asdict(self)


ProbeFn = Callable[[ProbeRequest], ProbeResult]


def tactics_for(mode: str, every: int, chunk_tokens: int, seq_len: int,
                syncs: tuple[str, ...] = ("last",)) -> list[Tactic]:
    """Memory tactics, weakest first; each with every gradient sync in `syncs` (FSDP)."""
    if mode != "auto":
        memory = [(mode, chunk_tokens)]
    else:
        # A quarter sequence, so chunking still helps at micro-batch 1.
        chunk = chunk_tokens or max(1, min(DEFAULT_CHUNK_TOKENS, seq_len // 4))
        memory = [("none", chunk_tokens), ("all", chunk_tokens), ("all", chunk)]
    tactics = [Tactic(ckpt, every, tokens, sync) for ckpt, tokens in memory for sync in syncs]
    return list(dict.fromkeys(tactics))  # chunking already on: the last two are one


def sync_choices(strategy: str, world_size: int, configured: str) -> tuple[str, ...]:
    """The FSDP gradient syncs the search may try: both for "auto" under FSDP, else one."""
    if strategy != "fsdp" or world_size <= 1:
        return ("last",)
    return ("last", "every") if configured == "auto" else (configured,)


def _setup(base: Setup, tactic: Tactic, micro_batch_size: int, per_rank: int) -> Setup:
    return replace(base, micro_batch_size=micro_batch_size, checkpointing=tactic.checkpointing,
                   checkpoint_every=tactic.checkpoint_every,
                   loss_chunk_tokens=tactic.loss_chunk_tokens,
                   num_micro_steps=per_rank // micro_batch_size,
                   gradient_sync=tactic.gradient_sync)


def probe_micro_steps(micro_batch_size: int, per_rank: int) -> int:
    return max(2, min(4, per_rank // micro_batch_size))


def _probed(setup: Setup, per_rank: int, wrapped: bool = False) -> Setup:
    """What the probe of `setup` really runs: one unwrapped process (or, `wrapped`, the wrapper
    on all its ranks), its own micro-steps."""
    steps = probe_micro_steps(setup.micro_batch_size, per_rank)
    if wrapped:
        return replace(setup, num_micro_steps=steps)
    return replace(setup, world_size=1, strategy="ddp", gradient_sync="last",
                   num_micro_steps=steps)


def _describe(tactic: Tactic, sharded: bool = False) -> str:
    chunk = f"loss chunks of {tactic.loss_chunk_tokens}" if tactic.loss_chunk_tokens else \
        "whole loss"
    sync = f", reduce-scatter {tactic.gradient_sync} micro-step" if sharded else ""
    return f"checkpointing {tactic.checkpointing}, {chunk}{sync}"


def search_tactic(dims: ModelDims, base: Setup, tactic: Tactic, sizes: list[int], budget: int,
                  device: str, allocator: str, probe: ProbeFn, wrapped: bool = False
                  ) -> tuple[list[Candidate], Calibration]:
    """Predict, probe, fit and measure one tactic's candidates (see the module docstring)."""
    default = Calibration(DEFAULT_OVERHEAD["cuda" if device.startswith("cuda") else "cpu"])
    calibration = default
    per_rank = max(sizes)

    def setup(size: int) -> Setup:
        return _setup(base, tactic, size, per_rank)

    def predict(size: int) -> int:
        return estimate_memory(dims, setup(size), calibration).total

    candidates = {size: Candidate(size, predict(size), wrapper_bytes=static_bytes(
        dims, setup(size)) - static_bytes(dims, _probed(setup(size), per_rank, wrapped)))
                  for size in sizes}
    wrapper = (dict(world_size=base.world_size, strategy=base.strategy,
                    gradient_sync=tactic.gradient_sync, num_steps=WRAPPED_PROBE_STEPS)
               if wrapped else {})

    def measure(size: int) -> None:
        request = ProbeRequest(dims, size, num_micro_steps=probe_micro_steps(size, per_rank),
                               precision=base.precision, checkpointing=tactic.checkpointing,
                               checkpoint_every=tactic.checkpoint_every,
                               loss_chunk_tokens=tactic.loss_chunk_tokens,
                               loss_kernel=base.loss_kernel, device=device, allocator=allocator,
                               **wrapper)
        result = probe(request)
        found = candidates[size]
        found.measured_bytes, found.tokens_per_s = result.peak_bytes, result.tokens_per_s
        found.note = "" if result.ok else result.error

    def refit() -> None:
        nonlocal calibration
        # Against what each probe ran (one unwrapped rank), never the wrapped setup: the fit
        # must not absorb the wrapper's terms into its overhead (unless the probe ran them).
        points = [(_probed(setup(c.micro_batch_size), per_rank, wrapped), c.measured_bytes)
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
                       probe: ProbeFn = run_probe, gradient_sync: str = "auto",
                       wrapped_probe: bool = False) -> MemoryPlan:
    """The plan for one rank; `base` carries precision, optimizer, world size, strategy, data;
    `gradient_sync` is `parallel.fsdp_gradient_sync`; `wrapped_probe` probes under the wrapper
    on `base.world_size` ranks (module docstring)."""
    per_rank = sequences_per_rank(global_tokens, dims.seq_len, base.world_size)
    sizes = divisors(per_rank, per_rank)
    sharded = base.strategy == "fsdp" and base.world_size > 1
    syncs = sync_choices(base.strategy, base.world_size, gradient_sync)
    tried, failed = [], []
    smallest_need = None
    for tactic in tactics_for(mode, checkpoint_every, loss_chunk_tokens, dims.seq_len, syncs):
        tried.append(_describe(tactic, sharded))
        candidates, calibration = search_tactic(dims, base, tactic, sizes, budget, device,
                                                allocator, probe, wrapped_probe)
        failed += [(c, tried[-1]) for c in candidates if c.note]
        measured = [c for c in candidates if c.fits(budget) and c.tokens_per_s is not None]
        need = candidates[0].need_bytes()
        smallest_need = need if smallest_need is None else min(smallest_need, need)
        if not measured:
            continue
        fastest = max(c.tokens_per_s for c in measured)
        best = max((c for c in measured if c.tokens_per_s >= (1 - SPEED_TIE) * fastest),
                   key=lambda c: c.micro_batch_size)
        setup = _setup(base, tactic, best.micro_batch_size, per_rank)
        estimate = estimate_memory(dims, setup, calibration)
        one_rank = estimate_memory(dims, replace(setup, world_size=1), calibration)
        return MemoryPlan(
            micro_batch_size=best.micro_batch_size,
            num_micro_steps=per_rank // best.micro_batch_size,
            activation_checkpointing=tactic.checkpointing,
            checkpoint_every=tactic.checkpoint_every,
            loss_chunk_tokens=tactic.loss_chunk_tokens,
            predicted_peak_bytes=estimate.total, budget_bytes=budget,
            components=estimate.components(), calibration=asdict(calibration),
            global_tokens=global_tokens, seq_len=dims.seq_len, world_size=base.world_size,
            sequences_per_rank=per_rank, strategy=base.strategy,
            allreduce_bytes_per_step=allreduce_bytes_per_step(
                dims, base.world_size, base.strategy, setup.num_micro_steps, base.precision,
                tactic.gradient_sync),
            device=device, candidates=[asdict(c) for c in candidates], tactics_tried=tried,
            fsdp_gradient_sync=tactic.gradient_sync,
            one_rank_components=one_rank.components(), probed_under_wrapper=wrapped_probe)
    if failed and smallest_need <= budget:
        # The memory model says it fits, yet no probe ran: say what the probes said.
        seen = "; ".join(f"micro-batch {c.micro_batch_size} ({how}): {c.note}"
                         for c, how in failed[:3])
        raise UsageError(f"batch.micro_batch_size = \"auto\": every probe that should fit "
                         f"{format_bytes(budget)} failed: {seen}")
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
                                 plan.loss_chunk_tokens, plan.fsdp_gradient_sync))
    mine = torch.tensor([plan.micro_batch_size, -index], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.to(plan.device)  # this rank's own GPU (cuda:LOCAL_RANK), never cuda:0
    dist.all_reduce(mine, op=dist.ReduceOp.MIN)
    size, tactic = int(mine[0]), tactics[-int(mine[1])]
    return replace(plan, micro_batch_size=size, num_micro_steps=plan.sequences_per_rank // size,
                   activation_checkpointing=tactic.checkpointing,
                   checkpoint_every=tactic.checkpoint_every,
                   loss_chunk_tokens=tactic.loss_chunk_tokens,
                   fsdp_gradient_sync=tactic.gradient_sync)
