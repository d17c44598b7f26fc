"""`train.task = "sft"`: supervised fine-tuning of a causal LM on prompt/response or chat rows,
the loss on the responses only, one slice: examples.py (rows -> ids and loss masks), packing.py
(examples -> rows, best-fit decreasing, positions restarting per example), loader.py (rows ->
each rank's micro-batches), padding.py (`data.packing = false`: whole examples in padded
token-budget micro-batches), evaluation.py (exact match of greedy generations), wiring.py (the
run)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bigbatch.tasks.lm import LanguageModelling

if TYPE_CHECKING:
    import torch

    from bigbatch.batch import MicroBatch
    from bigbatch.config.sections import Config
    from bigbatch.tasks.base import TaskContext, TaskRun


class SupervisedFineTuning(LanguageModelling):
    """Language modelling's batch arithmetic, planning and loss (rows of `data.seq_len` tokens,
    next-token cross-entropy over the targets that carry one); its own data, wiring and probe."""

    name = "sft"
    verifiable = False        # `bigbatch verify` builds the built-in GPT on token windows
    measures_critical_batch = False  # `bigbatch cbs` branches language-model runs

    def describe_batch(self, cfg: Config, world_size: int) -> list[str]:
        """Packed rows: language modelling's arithmetic. Padded (`data.packing = false`): the
        micro-steps follow the examples' lengths, so say the budgets instead of a count."""
        lines = super().describe_batch(cfg, world_size)
        if cfg.data.packing or cfg.batch.micro_batch_size == "auto":
            return lines
        from bigbatch.batch import split_batch
        from bigbatch.tasks.sft.padding import describe_padded_batch

        split = split_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size,
                            world_size)
        return [describe_padded_batch(split), *lines[2:]]

    def prepare(self, cfg: Config, ctx: TaskContext) -> TaskRun:
        from bigbatch.tasks.sft.wiring import prepare

        return prepare(cfg, ctx)

    def probe_batch(self, vocab_size: int, rows: int, seq_len: int,
                    device: torch.device) -> MicroBatch:
        """Full rows of one example each (positions 0..seq_len-1): packed rows' memory."""
        import torch

        from bigbatch.batch import MicroBatch

        ids = torch.randint(0, vocab_size, (rows, seq_len), device=device)
        positions = torch.arange(seq_len, device=device).expand(rows, seq_len)
        return MicroBatch(ids, torch.randint(0, vocab_size, (rows, seq_len), device=device),
                          positions.contiguous())


SFT = SupervisedFineTuning()
