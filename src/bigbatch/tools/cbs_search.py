"""The branch search behind `bigbatch cbs`, apart from any trainer: branches in, critical batch out.

From one starting point (a checkpoint), short branches train at batches B_1 < B_2 < ... (1x, 2x,
4x, 8x the run's). The smallest trains a fixed budget of tokens; the target loss is the loss it
reached after TARGET_FRACTION of that budget, so it reaches the target by construction and the
other branches have up to 1 / TARGET_FRACTION times its tokens to do so. Each branch's tokens to
the target, E(B), is read from its evaluations by linear interpolation (tools/sweep.py's
`crossing`). Following Zhang et al. (2024, "How Does Critical Batch Size Scale in
Pre-training?"), the critical batch is the largest batch whose E(B) stays within TOLERANCE (20%)
of the fewest tokens any branch needed: beyond it, a larger batch buys fewer steps with tokens
that a smaller batch would not have needed.

Where E(B) = E_min (1 + B / B_noise) (McCandlish et al. 2018), E(B) / E(B_1) is linear in B, so
the crossing of 1 + TOLERANCE, interpolated linearly in B between the last batch within and the
first beyond, is exact: B* = (1 + TOLERANCE) B_1 + TOLERANCE B_noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from bigbatch.errors import UsageError
from bigbatch.tools.sweep import crossing

TOLERANCE = 0.2        # Zhang et al. 2024: 20% more tokens than the most token-efficient batch
TARGET_FRACTION = 0.5  # the target: the smallest batch's loss after half its budget


@dataclass
class CriticalBatch:
    """The search's answer at one starting point, in the units of the batches (tokens)."""

    largest_within: int            # the largest batch, from the smallest up, within tolerance
    crossing: float | None         # where E(B) / E_ref meets 1 + tolerance (linear in B)
    first_beyond: int | None       # the smallest batch measured beyond tolerance (or not reached)
    reference_tokens: float        # E_ref: the fewest tokens to the target of any branch

    @property
    def estimate(self) -> float:
        """The critical batch: the crossing where one was measured, else the largest batch
        within tolerance (a lower bound when every batch was within)."""
        return self.crossing if self.crossing is not None else float(self.largest_within)


def critical_batch(batches: list[int], tokens: list[float | None],
                   tolerance: float = TOLERANCE) -> CriticalBatch:
    """The critical batch from tokens-to-target per batch (ascending batches; None: the branch
    never reached the target). The search walks up from the smallest batch and stops at the
    first batch beyond tolerance, so a noisy larger batch past it cannot move the answer."""
    if len(batches) != len(tokens) or not batches:
        raise ValueError("one tokens-to-target value per batch is needed")
    if sorted(batches) != list(batches) or len(set(batches)) != len(batches):
        raise ValueError(f"batches must be distinct and ascending: {batches}")
    if tokens[0] is None:
        raise ValueError("the smallest batch must reach the target: it defines it")
    reference = min(t for t in tokens if t is not None)
    limit = 1 + tolerance
    ratios = [None if t is None else t / reference for t in tokens]
    within = 0
    while within + 1 < len(batches) and ratios[within + 1] is not None \
            and ratios[within + 1] <= limit:
        within += 1
    if within + 1 == len(batches):
        return CriticalBatch(batches[within], None, None, reference)
    beyond = within + 1
    point = None
    if ratios[beyond] is not None:
        low, high = ratios[within], ratios[beyond]
        point = batches[within] + (limit - low) / (high - low) * (batches[beyond] - batches[within])
    return CriticalBatch(batches[within], point, batches[beyond], reference)


def loss_at(rows: list[dict], tokens: float) -> float:
    """The validation loss at `tokens`, linear between the evaluations around it."""
    evals = [r for r in rows if "val_loss" in r]
    for before, after in zip(evals, evals[1:], strict=False):
        if before["tokens"] <= tokens <= after["tokens"]:
            part = (tokens - before["tokens"]) / max(after["tokens"] - before["tokens"], 1e-12)
            return before["val_loss"] + part * (after["val_loss"] - before["val_loss"])
    raise ValueError(f"no evaluations around {tokens:,.0f} tokens")


@dataclass
class Branch:
    batch_tokens: int
    lr: float
    reached: bool
    tokens_to_target: float | None = None  # since the branch point
    steps_to_target: float | None = None
    final_loss: float | None = None
    tokens_trained: int = 0


@dataclass
class SearchResult:
    start_loss: float
    target_loss: float
    branches: list[Branch] = field(default_factory=list)
    critical: CriticalBatch | None = None

    def to_dict(self) -> dict:
        found = self.critical
        return {"start_loss": self.start_loss, "target_loss": self.target_loss,
                "branches": [asdict(b) for b in self.branches],
                "critical_batch_tokens": found.estimate if found else None,
                "largest_within_tokens": found.largest_within if found else None,
                "first_beyond_tokens": found.first_beyond if found else None,
                "crossing_tokens": found.crossing if found else None,
                "reference_tokens": found.reference_tokens if found else None}


# (batch tokens, target loss or None to train the whole budget, budget tokens) ->
# (the branch's evaluation rows, tokens and steps counted from the branch point and starting
# with the start point's loss at 0 tokens; the branch's learning rate)
BranchFn = Callable[[int, float | None, int], tuple[list[dict], float]]


def search(branch: BranchFn, batches: list[int], budget_tokens: int,
           tolerance: float = TOLERANCE, say: Callable[[str], None] = print) -> SearchResult:
    """Train the branches (the smallest first: it sets the target), stop at the first batch
    beyond tolerance (the larger ones would be beyond it too, and cost the most), and find the
    critical batch."""
    rows, lr = branch(batches[0], None, budget_tokens)
    start = rows[0]["val_loss"]
    target = loss_at(rows, TARGET_FRACTION * budget_tokens)
    if not target < start:
        raise UsageError(f"the {batches[0]:,}-token branch did not lower the validation loss "
                         f"({start:.4f} -> {target:.4f} after {TARGET_FRACTION * budget_tokens:,.0f}"
                         " tokens): raise --branch-tokens, or branch from earlier checkpoints")
    result = SearchResult(start, target)
    for batch in batches:
        if batch != batches[0]:
            rows, lr = branch(batch, target, budget_tokens)
        found = crossing(rows, target)
        evals = [r for r in rows if "val_loss" in r]
        result.branches.append(Branch(
            batch, lr, found is not None, found[1] if found else None,
            found[0] if found else None, evals[-1]["val_loss"], evals[-1]["tokens"]))
        tokens = [b.tokens_to_target for b in result.branches]
        say(f"  batch {batch:>9,}: " + (f"{found[1]:>11,.0f} tokens, {found[0]:6.1f} steps to "
                                        f"{target:.4f}" if found else "target not reached"))
        reference = min(t for t in tokens if t is not None)
        if found is None or found[1] > (1 + tolerance) * reference:
            break
    done = [b.batch_tokens for b in result.branches]
    result.critical = critical_batch(done, [b.tokens_to_target for b in result.branches],
                                     tolerance)
    return result
