"""Batch arithmetic, pure: the global batch is said once, the micro-steps are derived.

    global_tokens = seq_len * micro_batch_size * world_size * num_micro_steps

`global_tokens` is the product's one way to say the batch; `micro_batch_size` is the memory knob;
`num_micro_steps` (gradient accumulation steps per optimizer step) follows, and must be whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigbatch.errors import UsageError


@dataclass(frozen=True)
class BatchPlan:
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


def _divisors(n: int, limit: int) -> list[int]:
    """The divisors of `n` up to `limit`: bounded, so a huge batch does not take forever."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def plan_batch(global_tokens: int, seq_len: int, micro_batch_size: int,
               world_size: int = 1) -> BatchPlan:
    """Derive the number of micro-steps, or explain which nearby batches would divide."""
    tokens_per_micro_step = seq_len * micro_batch_size * world_size
    if global_tokens % tokens_per_micro_step == 0:
        return BatchPlan(global_tokens, seq_len, micro_batch_size, world_size,
                         global_tokens // tokens_per_micro_step)
    below = global_tokens // tokens_per_micro_step * tokens_per_micro_step
    above = below + tokens_per_micro_step
    nearest = [str(t) for t in (below, above) if t > 0]
    hint = f"nearest valid batch.global_tokens: {' or '.join(nearest)}"
    if global_tokens % (seq_len * world_size) == 0:
        per_rank = global_tokens // (seq_len * world_size)
        sizes = _divisors(per_rank, min(max(micro_batch_size * 4, 64), 4096))
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
