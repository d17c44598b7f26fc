"""What a batch is (the ground floor every room stands on): the micro-batch and its model
inputs, `IGNORE_INDEX`, and the one batch arithmetic.

    global_tokens = seq_len * micro_batch_size * world_size * num_micro_steps

`global_tokens` is the product's one way to say the batch; `micro_batch_size` is the memory knob;
`num_micro_steps` (gradient accumulation steps per optimizer step) follows and must be whole.
`split_batch` derives and checks it, and `sequences_per_rank` the per-rank batch it divides: the
planner, `verify`, rank advice and `bigbatch config` all ask these two, never their own copy.

A batch is anything with `num_targets()` (what its loss sum is divided by, summed over the
step), `model_inputs()` (the keyword arguments of the model's forward) and `to(device)`. Loss
functions call `model(**batch.model_inputs())`, so a new per-token field (document ids,
positions) reaches the model by being a field of the batch, without touching them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from bigbatch.errors import UsageError

if TYPE_CHECKING:
    import torch

# Targets that carry no loss (a document's first token predicted across a boundary, padding):
# PyTorch's own default ignore_index, so a user's batches made for F.cross_entropy work as they are.
IGNORE_INDEX = -100


class Batch(Protocol):
    def num_targets(self) -> torch.Tensor: ...

    def model_inputs(self) -> dict[str, torch.Tensor]: ...

    def to(self, device: torch.device) -> Batch: ...


class StepLoader(Protocol):
    """What fit() draws its steps from (a task's loader): this rank's micro-batches of the next
    step, the real tokens that step held on all ranks (for tokens/s, whatever the schedule
    counts), and the position to resume from."""

    last_step_tokens: int

    def next_step(self, shape: StepShape | None = None) -> list[Batch]: ...

    def state_dict(self) -> dict: ...


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU it goes through pinned (page-locked) memory, so the
    copy is truly asynchronous: from pageable memory `non_blocking=True` is a blocking copy."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass
class MicroBatch:
    """Token ids and their next-token targets; `num_targets()` counts the ones with a loss.
    Every field is a tensor with one row per sequence (or None where unset): `to()` and
    `first_rows()` carry all of them, so a field added here travels with the batch everywhere.

    `position_ids`, where set, say where the row's documents start: each token's position inside
    its document, 0 at every document's first token (and at the row's first, which may be inside
    one). A model given them attends within a document only (document masking; Hugging Face's
    packed-sequence convention, which transformers detects from these same positions)."""

    inputs: torch.Tensor   # (micro_batch_size, seq_len) token ids
    targets: torch.Tensor  # same shape; IGNORE_INDEX where no loss is taken
    position_ids: torch.Tensor | None = None  # same shape; restart at 0 at each document

    def num_targets(self) -> torch.Tensor:
        return (self.targets != IGNORE_INDEX).sum()

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The model's forward keyword arguments (Hugging Face's names); a field left None is
        not passed, so a model that never takes it is called as before."""
        inputs = {"input_ids": self.inputs}
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs

    def to(self, device: torch.device) -> MicroBatch:
        return self._each(lambda tensor: to_device(tensor, device))

    def first_rows(self, count: int) -> MicroBatch:
        """The first `count` sequences, every field cut alike."""
        return self._each(lambda tensor: tensor[:count])

    def _each(self, change) -> MicroBatch:
        return MicroBatch(*(None if getattr(self, f.name) is None else change(getattr(self, f.name))
                            for f in dataclasses.fields(self)))


@dataclass(frozen=True)
class BatchSplit:
    """A step of the full batch: its tokens, and how they split into micro-steps and ranks."""

    global_tokens: int
    seq_len: int
    micro_batch_size: int
    world_size: int
    num_micro_steps: int

    @property
    def global_sequences(self) -> int:
        return self.global_tokens // self.seq_len

    @property
    def sequences_per_rank(self) -> int:
        return self.global_sequences // self.world_size

    @property
    def micro_batch_tokens(self) -> int:
        return self.micro_batch_size * self.seq_len

    def describe(self) -> str:
        return (f"global batch {self.global_tokens:,} tokens = {self.global_sequences} sequences "
                f"x {self.seq_len} tokens = micro-batch {self.micro_batch_size} x "
                f"{self.num_micro_steps} micro-steps x {self.world_size} rank(s)")


@dataclass(frozen=True)
class StepShape:
    """What one optimizer step looks like (under a batch ramp or sequence-length warmup it
    differs from the full `BatchSplit`)."""

    global_tokens: int      # the step's global batch
    num_micro_steps: int    # per rank
    micro_batch_size: int   # sequences per micro-batch, at this step's length
    seq_len: int


def divisors(n: int, limit: int) -> list[int]:
    """The divisors of `n` up to `limit` (the micro-batch sizes that split `n` sequences evenly):
    bounded, so a huge batch does not take forever."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def sequences_per_rank(global_tokens: int, seq_len: int, world_size: int) -> int:
    """The per-rank batch in whole sequences, or a one-line error saying why it is not whole."""
    row_tokens = seq_len * world_size
    if global_tokens % row_tokens or global_tokens < row_tokens:
        raise UsageError(f"batch.global_tokens = {global_tokens} is not a multiple of data.seq_len "
                         f"x world size = {row_tokens}: the per-rank batch must be whole "
                         "sequences")
    return global_tokens // row_tokens


def split_batch(global_tokens: int, seq_len: int, micro_batch_size: int,
               world_size: int = 1) -> BatchSplit:
    """Derive the number of micro-steps, or explain which nearby batches would divide."""
    tokens_per_micro_step = seq_len * micro_batch_size * world_size
    if global_tokens % tokens_per_micro_step == 0:
        return BatchSplit(global_tokens, seq_len, micro_batch_size, world_size,
                         global_tokens // tokens_per_micro_step)
    below = global_tokens // tokens_per_micro_step * tokens_per_micro_step
    above = below + tokens_per_micro_step
    nearest = [str(t) for t in (below, above) if t > 0]
    hint = f"nearest valid batch.global_tokens: {' or '.join(nearest)}"
    if global_tokens % (seq_len * world_size) == 0:
        per_rank = global_tokens // (seq_len * world_size)
        sizes = divisors(per_rank, min(max(micro_batch_size * 4, 64), 4096))
        hint += f"; or batch.micro_batch_size in {sizes}"
    else:
        hint += (f" (global_tokens must be a multiple of seq_len x world_size = "
                 f"{seq_len * world_size})")
    if micro_batch_size * seq_len * world_size > global_tokens:
        raise UsageError(f"batch.micro_batch_size = {micro_batch_size} is larger than the per-rank "
                         f"batch ({global_tokens // (seq_len * world_size)} sequences of "
                         f"{seq_len} tokens on {world_size} rank(s)); {hint}")
    raise UsageError(f"batch.global_tokens = {global_tokens} is not a whole number of micro-steps "
                     f"of {micro_batch_size} x {seq_len} tokens x {world_size} rank(s) = "
                     f"{tokens_per_micro_step} tokens; {hint}")
