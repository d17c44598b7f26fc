"""`train.task = "sft"`: supervised fine-tuning of a causal LM on prompt/response or chat rows,
the loss on the responses only, one slice: examples.py (rows -> ids and loss masks), packing.py
(examples -> rows, best-fit decreasing, positions restarting per example), loader.py (rows ->
each rank's micro-batches), evaluation.py (exact match of greedy generations), wiring.py (the
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
