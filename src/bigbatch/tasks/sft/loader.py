"""Packed SFT rows -> each rank's micro-batches, by the language model's resumable sampler.

The global batch is `batch.global_tokens / data.seq_len` packed rows, drawn from a seeded
per-epoch permutation independent of the world size (data/loader.py's GlobalBatchSampler), so 2
ranks see exactly the rows 1 rank sees. A micro-batch's `num_targets()` counts its response
tokens; train_step divides every micro-batch's loss sum by the step's total over all micro-steps
and ranks, so the loss is the exact mean over the step's response tokens however unevenly they
fall (the Hugging Face accumulation bug, transformers #14638, is `mean / k` here).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bigbatch.batch import IGNORE_INDEX, BatchSplit, MicroBatch, StepShape
from bigbatch.data.loader import GlobalBatchSampler, shard_micro_batches
from bigbatch.errors import UsageError
from bigbatch.tasks.sft.packing import PackedRows


def require_full_length(shape: StepShape | None, split: BatchSplit) -> None:
    """SFT keeps examples whole up to data.seq_len (packed or padded); check_config refuses a
    sequence-length warmup at start-up, and a schedule that shortens a step anyway stops here."""
    if shape is not None and shape.seq_len != split.seq_len:
        raise UsageError("train.task = 'sft' keeps examples whole up to data.seq_len: a "
                         "sequence-length warmup would cut them (data.seq_len_warmup_tokens = 0)")


def rows_batch(rows: PackedRows, index: np.ndarray) -> MicroBatch:
    return MicroBatch(torch.from_numpy(rows.inputs[index]), torch.from_numpy(rows.targets[index]),
                      torch.from_numpy(rows.position_ids[index]))


class SFTLoader:
    """One rank's training stream of packed rows (the StepLoader protocol, batch.py)."""

    def __init__(self, rows: PackedRows, split: BatchSplit, rank: int, seed: int) -> None:
        if len(rows.inputs) < split.global_sequences:
            raise UsageError(f"the SFT training examples pack into {len(rows.inputs)} rows of "
                             f"data.seq_len = {split.seq_len} tokens, fewer than one global "
                             f"batch ({split.global_sequences} rows): lower "
                             "batch.global_tokens or data.seq_len, or give more examples")
        self.rows, self.split, self.rank = rows, split, rank
        self.sampler = GlobalBatchSampler(len(rows.inputs), split.global_sequences, seed)
        self.last_step_tokens = 0

    def next_step(self, shape: StepShape | None = None) -> list[MicroBatch]:
        split = self.split
        require_full_length(shape, split)
        num_micro_steps = shape.num_micro_steps if shape else split.num_micro_steps
        global_batch = self.sampler.next_global_batch(
            num_micro_steps * split.micro_batch_size * split.world_size)
        self.last_step_tokens = len(global_batch) * split.seq_len  # all ranks, for tokens/s
        return [rows_batch(self.rows, index)
                for index in shard_micro_batches(global_batch, self.rank, split.world_size,
                                                 split.micro_batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "num_windows" not in state:  # padding.py's sampler: examples, not rows
            raise UsageError("the checkpoint's data sampler drew padded examples (data.packing "
                             "= false): resume it with --data.packing=false")
        self.sampler.load_state_dict(state)


def eval_batches(rows: PackedRows, micro_batch_size: int, rank: int, world_size: int
                 ) -> list[MicroBatch]:
    """Every validation row once, dealt to the ranks in turn; ranks short of a batch get a
    fully masked one (FSDP runs a forward on every rank: evaluation's collectives match)."""
    chunks = [np.arange(start, min(start + micro_batch_size, len(rows.inputs)))
              for start in range(0, len(rows.inputs), micro_batch_size)]
    mine = [rows_batch(rows, index) for index in chunks[rank::world_size]]
    while len(mine) < -(-len(chunks) // world_size):
        first = rows_batch(rows, chunks[0])
        mine.append(MicroBatch(first.inputs, torch.full_like(first.targets, IGNORE_INDEX),
                               first.position_ids))
    return mine
