"""What a classification batch is: labelled token windows (ClassificationBatch) and the
step's arithmetic in texts (TextBatchSplit).

A micro-batch's `num_targets()` is the sum of its windows' weights (1 / the text's window count),
so train_step's normaliser (the step's total over micro-steps and ranks) makes the loss the exact
mean over the step's texts, whatever the micro-batches hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bigbatch.batch import to_device
from bigbatch.errors import UsageError


@dataclass
class ClassificationBatch:
    input_ids: torch.Tensor       # (windows, longest window) token ids, padded
    attention_mask: torch.Tensor  # same shape; 0 on padding
    labels: torch.Tensor          # (windows,) label ids
    weights: torch.Tensor         # (windows,) float64: 1 / windows of the window's text; 0 = filler
    doc_ids: torch.Tensor         # (windows,) the window's text (index into the split)

    def num_targets(self) -> torch.Tensor:
        """Texts in this micro-batch (fractions where a text's windows are spread)."""
        return self.weights.sum()

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    def to(self, device: torch.device) -> ClassificationBatch:
        return ClassificationBatch(*(to_device(t, device) for t in (
            self.input_ids, self.attention_mask, self.labels, self.weights, self.doc_ids)))


@dataclass(frozen=True)
class TextBatchSplit:
    """The global batch in texts; micro-batches in windows or padded tokens (they vary per step)."""

    global_sequences: int
    micro_batch_size: int      # windows per micro-batch (0 when micro_batch_tokens is set)
    micro_batch_tokens: int    # padded tokens per micro-batch; 0 = off
    world_size: int

    def describe(self) -> str:
        size = (f"up to {self.micro_batch_tokens} padded tokens" if self.micro_batch_tokens
                else f"{self.micro_batch_size} windows")
        return (f"global batch {self.global_sequences} texts (all their windows) = "
                f"{self.global_sequences // self.world_size} per rank x {self.world_size} "
                f"rank(s); micro-batches of {size}, grouped by length, padded per micro-batch")


def split_text_batch(global_sequences: int, micro_batch_size: int | str, micro_batch_tokens: int,
                  max_length: int, world_size: int) -> TextBatchSplit:
    if global_sequences < 1:
        raise UsageError("train.task = \"classify\" needs batch.global_sequences (texts per "
                         "optimizer step), e.g. 256")
    if global_sequences % world_size:
        raise UsageError(f"batch.global_sequences = {global_sequences} is not divisible by the "
                         f"{world_size} ranks")
    if micro_batch_tokens and micro_batch_tokens < max_length:
        raise UsageError(f"batch.micro_batch_tokens = {micro_batch_tokens} is smaller than one "
                         f"window (data.max_length = {max_length}): give at least {max_length}")
    if not micro_batch_tokens and not isinstance(micro_batch_size, int):
        raise UsageError(f"batch.micro_batch_size = {micro_batch_size!r}: classification takes a "
                         "number of windows, or batch.micro_batch_tokens")
    return TextBatchSplit(global_sequences, 0 if micro_batch_tokens else int(micro_batch_size),
                        micro_batch_tokens, world_size)
