"""`train.task = "sft"`: supervised fine-tuning of a causal LM on prompt/response or chat rows,
the loss on the responses only, one slice: examples.py (rows -> ids and loss masks), packing.py
(examples -> rows, best-fit decreasing, positions restarting per example), loader.py (rows ->
each rank's micro-batches), evaluation.py (exact match of greedy generations), wiring.py (the
run)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from bigbatch.batch import MicroBatch
    from bigbatch.config.sections import Config
    from bigbatch.engine.step import LossSumFn
    from bigbatch.tasks.base import TaskContext, TaskRun


class SupervisedFineTuning:
    name = "sft"
    unit = "tokens"
    model_head = "causal-lm"  # wiring.MODEL_HEAD
    verifiable = False        # `bigbatch verify` builds the built-in GPT on token windows
    measures_critical_batch = False  # `bigbatch cbs` branches language-model runs
    probe_labels = None

    def prepare(self, cfg: Config, ctx: TaskContext) -> TaskRun:
        from bigbatch.tasks.sft.wiring import prepare

        return prepare(cfg, ctx)

    def describe_batch(self, cfg: Config, world_size: int) -> list[str]:
        from bigbatch.tasks.lm import LM

        return LM.describe_batch(cfg, world_size)  # the same arithmetic: rows of seq_len tokens

    def planning_config(self, cfg: Config) -> Config:
        return cfg

    def probe_loss_sum(self) -> LossSumFn:
        from bigbatch.engine.step import lm_loss_sum

        return lm_loss_sum

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
