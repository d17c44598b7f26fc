"""Per-step batch arithmetic under a batch-size ramp and a sequence-length warmup (pure).

One micro-step across ranks always holds the same number of tokens,

    unit = batch.micro_batch_size x data.seq_len x world_size,

so the two warmups combine without touching each other:

- **Batch ramp** (Smith et al. 2017, "Don't decay the learning rate, increase the batch size"):
  the global batch is a whole number of units, and only the number of micro-steps changes.
  `linear` grows it from `batch.ramp_start_tokens` to `batch.global_tokens` over
  `batch.ramp_tokens` training tokens (rounded down to whole units); `doubling` doubles it at
  evenly spaced tokens over `batch.ramp_tokens` (the batch warmup of Merrill et al. 2025);
  `auto` follows the measured gradient noise scale (McCandlish et al. 2018) by whole factors:
  once the averages have re-measured at the current batch (1 / (1 - batch.noise_scale_ema)
  steps), the batch is multiplied by the largest whole factor up to `batch.ramp_max_growth`
  that keeps it at or below both the noise scale and the full batch (never shrinking).
- **Sequence-length warmup** (Li et al. 2021): the length grows linearly from
  `data.seq_len_start` to `data.seq_len` over `data.seq_len_warmup_tokens`, rounded down to a
  divisor of `data.seq_len`, and each micro-batch holds `seq_len / length` times as many
  sequences. The loader cuts each sampled full-length window into that many shorter ones, so
  the sampler and its resume position are the same as without warmup.

Training length is counted in tokens (`train.max_steps x batch.global_tokens`), and the LR
schedule by the tokens at the end of each step (optim/schedule.py), so a ramp changes the
number of steps but not where warmup and decay fall. Without a ramp both are the plain step
counts, and every step is the full `BatchSplit`.
"""

from __future__ import annotations

from dataclasses import dataclass

from bigbatch.batch import BatchSplit, StepShape
from bigbatch.config.sections import Config
from bigbatch.errors import UsageError


def ramp_micro_steps(tokens_seen: int, start: int, full: int, ramp_tokens: int) -> int:
    """Linear ramp in whole micro-steps: `start` at 0 tokens, `full` from `ramp_tokens` on."""
    if ramp_tokens <= 0 or tokens_seen >= ramp_tokens:
        return full
    return start + (full - start) * tokens_seen // ramp_tokens


def doubling_micro_steps(tokens_seen: int, start: int, full: int, ramp_tokens: int) -> int:
    """Doubling ramp: `start` x 2^k after k of the n doublings that fit below `full`, the i-th at
    i/n of `ramp_tokens`; `full` from `ramp_tokens` on."""
    if ramp_tokens <= 0 or tokens_seen >= ramp_tokens:
        return full
    doublings = (full // start).bit_length() - 1  # the largest n with start x 2^n <= full
    return start << min(doublings, doublings * tokens_seen // ramp_tokens)


def auto_micro_steps(noise_tokens: float | None, unit_tokens: int, previous: int, start: int,
                     full: int, max_growth: int = 2, may_grow: bool = True) -> int:
    """The next batch of the auto ramp, in whole micro-steps: the current one (the previous
    step's, or `start`) times the largest whole factor f <= `max_growth` that keeps it within
    the noise scale and `full`; unchanged when no f >= 2 fits or `may_grow` is False (the
    averages have not yet re-measured at the current batch). So it never shrinks, only ever
    multiplies by whole factors, and never passes `full`."""
    current = min(full, max(start, previous))
    if not may_grow or not noise_tokens or noise_tokens <= 0:
        return current
    wanted = int(noise_tokens // unit_tokens)
    factor = min(max_growth, wanted // current, full // current)
    return current * factor if factor >= 2 else current


def warmup_seq_len(tokens_seen: int, start: int, full: int, warmup_tokens: int) -> int:
    """The largest divisor of `full` not above the linear warmup's length (and not below
    `start`): a window of `full` tokens then splits into whole sequences."""
    if warmup_tokens <= 0 or tokens_seen >= warmup_tokens:
        return full
    linear = start + (full - start) * tokens_seen // warmup_tokens
    return max(d for d in range(start, full + 1) if full % d == 0 and d <= max(linear, start))


@dataclass(frozen=True)
class BatchSchedule:
    full_batch: BatchSplit     # the full batch, as said at start-up
    ramp: str                  # "linear" | "doubling" | "auto"
    ramp_tokens: int
    start_micro_steps: int
    seq_len_start: int
    seq_len_warmup_tokens: int
    max_steps: int             # train.max_steps: the run is max_steps full batches of tokens
    max_growth: int = 2        # auto: the largest whole factor of one change
    hold_steps: int = 1        # auto: steps at a batch before it may grow again

    def may_grow(self, steps_at_batch: int) -> bool:
        """Auto: the noise-scale averages have had `hold_steps` steps at the current batch, so
        they measure it rather than the smaller batches before it."""
        return steps_at_batch >= self.hold_steps

    @property
    def unit_tokens(self) -> int:
        return self.full_batch.micro_batch_tokens * self.full_batch.world_size

    @property
    def total_tokens(self) -> int:
        """The run's training tokens; the last step may end past them (never by a full batch)."""
        return self.max_steps * self.full_batch.global_tokens

    @property
    def ramps_batch(self) -> bool:
        return self.ramp == "auto" or self.ramp_tokens > 0

    @property
    def ramps(self) -> bool:
        return self.ramps_batch or self.seq_len_warmup_tokens > 0

    def shape(self, tokens_seen: int, noise_tokens: float | None = None,
              previous_micro_steps: int = 0, steps_at_batch: int = 0) -> StepShape:
        full = self.full_batch.num_micro_steps
        if self.ramp == "auto":
            steps = auto_micro_steps(noise_tokens, self.unit_tokens, previous_micro_steps,
                                     self.start_micro_steps, full, self.max_growth,
                                     self.may_grow(steps_at_batch))
        elif self.ramp == "doubling":
            steps = doubling_micro_steps(tokens_seen, self.start_micro_steps, full,
                                         self.ramp_tokens)
        else:
            steps = ramp_micro_steps(tokens_seen, self.start_micro_steps, full, self.ramp_tokens)
        seq_len = warmup_seq_len(tokens_seen, self.seq_len_start, self.full_batch.seq_len,
                                 self.seq_len_warmup_tokens)
        return StepShape(steps * self.unit_tokens, steps,
                         self.full_batch.micro_batch_size * self.full_batch.seq_len // seq_len, seq_len)

    def num_steps(self) -> int:
        """Optimizer steps in the run (auto ramp: as if the batch never grew, an upper bound)."""
        if self.ramp != "auto" and not self.ramp_tokens:  # the batch never changes
            return self.max_steps
        tokens, steps, micro_steps = 0, 0, 0
        while tokens < self.total_tokens:
            micro_steps = self.shape(tokens, None, micro_steps).num_micro_steps
            tokens += micro_steps * self.unit_tokens
            steps += 1
        return steps


def build_batch_schedule(cfg: Config, split: BatchSplit) -> BatchSchedule:
    """Check the ramp settings against the planned batch; one-line errors name the key."""
    unit = split.micro_batch_tokens * split.world_size
    batch = cfg.batch
    ramping = batch.ramp == "auto" or batch.ramp_tokens > 0
    auto = batch.ramp == "auto"
    # 0 = the smallest start: one micro-step, or for auto the two the noise scale is measured
    # with (the full batch if it is smaller: then auto is a fixed batch that measures nothing)
    start = batch.ramp_start_tokens or min(2 * unit if auto else unit, split.global_tokens)
    if ramping and start % unit:
        raise UsageError(f"batch.ramp_start_tokens = {batch.ramp_start_tokens} is not a whole "
                         f"number of micro-steps of {unit} tokens (micro_batch_size x seq_len x "
                         f"world_size): use {max(unit, start // unit * unit)} or "
                         f"{(start // unit + 1) * unit}")
    if auto and batch.ramp_start_tokens and start // unit < 2:
        raise UsageError(f"batch.ramp = \"auto\" measures the noise scale from 2+ micro-steps "
                         f"per step: set batch.ramp_start_tokens to at least {2 * unit}")
    seq_start = cfg.data.seq_len_start if cfg.data.seq_len_warmup_tokens else split.seq_len
    return BatchSchedule(split, batch.ramp, batch.ramp_tokens,
                         start // unit if ramping else split.num_micro_steps, seq_start,
                         cfg.data.seq_len_warmup_tokens, cfg.train.max_steps,
                         batch.ramp_max_growth, max(1, round(1 / (1 - batch.noise_scale_ema))))


def describe_schedule(schedule: BatchSchedule) -> list[str]:
    """Start-up lines for what ramps, if anything."""
    lines = []
    unit = schedule.unit_tokens
    if schedule.ramp == "auto":
        lines.append(f"batch ramp: auto, from {schedule.start_micro_steps * unit:,} tokens "
                     f"towards the measured noise scale, at most {schedule.full_batch.global_tokens:,}"
                     f", by whole factors up to {schedule.max_growth}x at most once per "
                     f"{schedule.hold_steps} steps")
    elif schedule.ramp_tokens:
        lines.append(f"batch ramp: {schedule.ramp}, {schedule.start_micro_steps * unit:,} -> "
                     f"{schedule.full_batch.global_tokens:,} tokens over {schedule.ramp_tokens:,} "
                     f"tokens, in steps of {unit:,} tokens ({schedule.num_steps()} steps)")
    if schedule.seq_len_warmup_tokens:
        lines.append(f"sequence-length warmup: {schedule.seq_len_start} -> "
                     f"{schedule.full_batch.seq_len} tokens over {schedule.seq_len_warmup_tokens:,} "
                     f"tokens (divisors of {schedule.full_batch.seq_len}; "
                     f"{schedule.full_batch.micro_batch_tokens:,} tokens per micro-batch throughout)")
    return lines
