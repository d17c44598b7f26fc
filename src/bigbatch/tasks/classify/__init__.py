"""`train.task = "classify"`: labelled texts and a Hugging Face classifier, one slice: batch.py
(what its batch is, its arithmetic in texts), data.py (files -> windows -> loader), loss.py (the
loss and the evaluation), wiring.py (the run)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from bigbatch.config.sections import Config
    from bigbatch.engine.step import LossSumFn
    from bigbatch.tasks.base import TaskContext, TaskRun
    from bigbatch.tasks.classify.batch import ClassificationBatch


class Classification:
    name = "classify"
    unit = "texts"
    model_head = "sequence-classification"  # wiring.MODEL_HEAD
    verifiable = False
    measures_critical_batch = False
    probe_labels = ["0", "1"]  # the planner probes a two-label head (probe_batch draws from it)

    def prepare(self, cfg: Config, ctx: TaskContext) -> TaskRun:
        from bigbatch.tasks.classify.wiring import prepare

        return prepare(cfg, ctx)

    def describe_batch(self, cfg: Config, world_size: int) -> list[str]:
        from bigbatch.tasks.classify.batch import split_text_batch

        return [split_text_batch(cfg.batch.global_sequences, cfg.batch.micro_batch_size,
                              cfg.batch.micro_batch_tokens, cfg.data.max_length,
                              world_size).describe()]

    def planning_config(self, cfg: Config) -> Config:
        """`global_sequences` windows of `max_length` tokens, every window full: the most memory
        a micro-batch of that many windows can take."""
        return dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, seq_len=cfg.data.max_length),
            batch=dataclasses.replace(cfg.batch, global_tokens=cfg.batch.global_sequences
                                      * cfg.data.max_length))

    def probe_loss_sum(self) -> LossSumFn:
        from bigbatch.tasks.classify.loss import classification_loss_sum

        return classification_loss_sum

    def probe_batch(self, vocab_size: int, rows: int, seq_len: int,
                    device: torch.device) -> ClassificationBatch:
        """Full windows of two labels (the probe's classifier has two outputs)."""
        import torch

        from bigbatch.tasks.classify.batch import ClassificationBatch

        ids = torch.randint(0, vocab_size, (rows, seq_len), device=device)
        return ClassificationBatch(ids, torch.ones_like(ids),
                                   torch.randint(0, 2, (rows,), device=device),
                                   torch.ones(rows, dtype=torch.float64, device=device),
                                   torch.arange(rows, device=device))


CLASSIFY = Classification()
