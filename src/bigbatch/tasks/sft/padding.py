"""Examples -> padded micro-batches of whole examples, for `data.packing = false`.

Each example is its own sequence (its next-token pairs, cut to `data.seq_len` as packing cuts
them, and counted). A step holds the examples drawn from a seeded per-epoch order (independent
of the world size) while their real tokens fit the step's token budget (`batch.global_tokens`,
or the ramped step's). The step's examples, longest first, are cut into micro-batches of at most
`micro_batch_size x seq_len` padded tokens (the memory knob keeps meaning the same memory;
classify's `token_budget_cuts`, which also weighs padding against the number of micro-batches),
and each micro-batch is padded only to its own longest example.

Right padding needs no attention mask and no positions: in a causal model a token attends only
to itself and earlier ones, so the pad tokens after an example change none of its logits, and
its positions are 0.. as when it runs alone. The pads' targets are IGNORE_INDEX, so they carry
no loss and no gradient. Any causal LM works, packed-sequence support or not.

The cut is made over the whole step and the micro-batches are dealt to the ranks in turn, so
N ranks together hold exactly the one-rank micro-batches. Every rank must run as many micro-steps
(DDP's all-reduce on the last, FSDP's gathers in every forward): the short ranks get filler
micro-batches of one pad token with no target. Fillers, not a finer cut: a finer cut would make
the micro-batches depend on the world size, and a one-token forward costs next to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bigbatch.batch import IGNORE_INDEX, BatchSplit, MicroBatch, StepShape
from bigbatch.data.window_order import WindowOrder
from bigbatch.errors import UsageError
from bigbatch.tasks.classify.data import token_budget_cuts
from bigbatch.tasks.sft.loader import require_full_length
from bigbatch.tasks.sft.packing import example_pairs


@dataclass(frozen=True)
class PaddedExamples:
    """Every example's (inputs, targets) pairs, cut to `seq_len`; padded when batched."""

    inputs: list[np.ndarray]   # per example: (n,) int64 input ids
    targets: list[np.ndarray]  # per example: (n,) int64; IGNORE_INDEX where no loss
    lengths: np.ndarray        # (examples,) int64: n of each
    pad_id: int
    truncated: int             # examples cut to seq_len

    @property
    def examples(self) -> int:
        return len(self.inputs)

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum()) * 16


def pad_examples(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int,
                 pad_id: int) -> PaddedExamples:
    pairs = [example_pairs(ids, loss, seq_len) for ids, loss in examples]
    return PaddedExamples([p[0] for p in pairs], [p[1] for p in pairs],
                          np.array([len(p[0]) for p in pairs], dtype=np.int64), pad_id,
                          truncated=sum(cut for _, _, cut in pairs))


def collate(examples: PaddedExamples, chosen: np.ndarray) -> MicroBatch:
    """Examples `chosen`, right-padded to the longest of them."""
    longest = int(examples.lengths[chosen].max())
    inputs = np.full((len(chosen), longest), examples.pad_id, dtype=np.int64)
    targets = np.full((len(chosen), longest), IGNORE_INDEX, dtype=np.int64)
    for row, i in enumerate(chosen):
        n = examples.lengths[i]
        inputs[row, :n], targets[row, :n] = examples.inputs[i], examples.targets[i]
    return MicroBatch(torch.from_numpy(inputs), torch.from_numpy(targets))


def filler(pad_id: int) -> MicroBatch:
    """One pad token without a target: adds nothing to the loss or its count, but keeps a short
    rank's micro-steps in step with the others'."""
    return MicroBatch(torch.full((1, 1), pad_id, dtype=torch.int64),
                      torch.full((1, 1), IGNORE_INDEX, dtype=torch.int64))


def cut_micro_batches(lengths: np.ndarray, chosen: np.ndarray, micro_batch_tokens: int
                      ) -> list[np.ndarray]:
    """`chosen` example indices, longest first, cut into runs of at most `micro_batch_tokens`
    padded tokens (pure)."""
    ordered = chosen[np.argsort(-lengths[chosen], kind="stable")]
    bounds = token_budget_cuts(lengths[ordered], micro_batch_tokens)
    return [ordered[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def rank_micro_batches(examples: PaddedExamples, chosen: np.ndarray, micro_batch_tokens: int,
                       rank: int, world_size: int) -> list[MicroBatch]:
    """This rank's share of the step's micro-batches (every `world_size`-th), with fillers up to
    the most any rank has."""
    groups = cut_micro_batches(examples.lengths, chosen, micro_batch_tokens)
    mine = [collate(examples, group) for group in groups[rank::world_size]]
    mine += [filler(examples.pad_id)] * (-(-len(groups) // world_size) - len(mine))
    return mine


class TokenBudgetSampler:
    """Example indices for each step, every example once per epoch in a seeded order: the
    leading examples whose tokens fit the budget. An epoch's leftover that the epoch runs out
    of before the budget is full is skipped, and the next epoch starts a fresh order (as the
    language model's GlobalBatchSampler skips its last partial batch)."""

    def __init__(self, lengths: np.ndarray, seed: int) -> None:
        self.lengths, self.seed = lengths, seed
        self.shortest = max(1, int(lengths.min()))
        self.epoch, self.position = 0, 0
        self._order = WindowOrder(len(lengths), seed, 0)

    def next_step(self, budget: int) -> np.ndarray:
        while True:
            left = len(self.lengths) - self.position
            # budget // shortest + 1 examples hold more than the budget: enough to find the cut
            candidates = self._order.take(self.position, min(left, budget // self.shortest + 1))
            total = np.cumsum(self.lengths[candidates])
            fit = int(np.searchsorted(total, budget, side="right"))
            if fit < len(candidates):  # the next example would overflow: the step is full
                self.position += fit
                return candidates[:fit]
            self.epoch, self.position = self.epoch + 1, 0
            self._order = WindowOrder(len(self.lengths), self.seed, self.epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.lengths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "num_examples" not in state:
            raise UsageError("the checkpoint's data sampler drew packed rows (data.packing = "
                             "true): resume it with --data.packing=true")
        if state["num_examples"] != len(self.lengths) or state["seed"] != self.seed:
            raise UsageError("the checkpoint's data sampler was built for other examples or "
                             f"seed ({state['num_examples']} examples, seed {state['seed']}; now "
                             f"{len(self.lengths)} examples, seed {self.seed})")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = WindowOrder(len(self.lengths), self.seed, self.epoch)


class PaddedLoader:
    """One rank's training stream of padded micro-batches (the StepLoader protocol, batch.py).
    A micro-batch's `num_targets()` counts its response tokens and train_step divides by the
    step's total, so the loss stays the exact mean over the step's response tokens."""

    def __init__(self, examples: PaddedExamples, split: BatchSplit, rank: int,
                 seed: int) -> None:
        tokens = int(examples.lengths.sum())
        if tokens <= split.global_tokens:
            raise UsageError(f"the SFT training examples hold {tokens:,} tokens, not more than "
                             f"one global batch (batch.global_tokens = {split.global_tokens:,}): "
                             "lower batch.global_tokens, or give more examples")
        self.examples, self.split, self.rank = examples, split, rank
        self.sampler = TokenBudgetSampler(examples.lengths, seed)
        self.last_step_tokens = 0

    def next_step(self, shape: StepShape | None = None) -> list[MicroBatch]:
        split = self.split
        require_full_length(shape, split)
        chosen = self.sampler.next_step(shape.global_tokens if shape else split.global_tokens)
        self.last_step_tokens = int(self.examples.lengths[chosen].sum())  # all ranks, real
        return rank_micro_batches(self.examples, chosen, split.micro_batch_tokens, self.rank,
                                  split.world_size)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def describe_padded_batch(split: BatchSplit) -> str:
    return (f"up to {split.global_tokens:,} tokens of whole examples per step, in micro-batches "
            f"of up to {split.micro_batch_size} x {split.seq_len} = {split.micro_batch_tokens:,} "
            f"padded tokens x {split.world_size} rank(s) (as many micro-steps as the examples' "
            "lengths need)")


def padded_eval_batches(examples: PaddedExamples, micro_batch_tokens: int, rank: int,
                        world_size: int) -> list[MicroBatch]:
    """Every validation example once, cut as a training step is and dealt to the ranks."""
    return rank_micro_batches(examples, np.arange(examples.examples), micro_batch_tokens, rank,
                              world_size)
