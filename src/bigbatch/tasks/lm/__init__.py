"""`train.task = "lm"`: next-token prediction on a text corpus, with the built-in GPT or a Hugging
Face causal LM (wiring.py builds the run; the data is data/'s packed token windows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from bigbatch.batch import MicroBatch
    from bigbatch.config.sections import Config
    from bigbatch.engine.step import LossSumFn
    from bigbatch.tasks.base import TaskContext, TaskRun


class LanguageModelling:
    name = "lm"
    unit = "tokens"
    model_head = "causal-lm"  # wiring.MODEL_HEAD
    verifiable = True
    measures_critical_batch = True
    probe_labels = None

    def prepare(self, cfg: Config, ctx: TaskContext) -> TaskRun:
        from bigbatch.tasks.lm.wiring import prepare

        return prepare(cfg, ctx)

    def describe_batch(self, cfg: Config, world_size: int) -> list[str]:
        from bigbatch.batch import split_batch
        from bigbatch.engine.batch_schedule import build_batch_schedule, describe_schedule
        from bigbatch.optim.schedule import describe_lr_scaling

        if cfg.batch.micro_batch_size == "auto":
            return ["micro_batch_size = \"auto\": `bigbatch split` shows what training will choose"]
        split = split_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size,
                          world_size)
        reference = cfg.optim.reference_batch_tokens or split.global_tokens
        return [split.describe(),
                f"num_micro_steps = global_tokens / (micro_batch_size * seq_len * world_size) = "
                f"{split.global_tokens} / ({split.micro_batch_size} * {split.seq_len} * "
                f"{split.world_size}) = {split.num_micro_steps}",
                describe_lr_scaling(cfg.optim.lr, cfg.optim.lr_scaling, split.global_tokens,
                                    reference),
                *describe_schedule(build_batch_schedule(cfg, split))]

    def planning_config(self, cfg: Config) -> Config:
        return cfg

    def probe_loss_sum(self) -> LossSumFn:
        from bigbatch.engine.step import lm_loss_sum

        return lm_loss_sum

    def probe_batch(self, vocab_size: int, rows: int, seq_len: int,
                    device: torch.device) -> MicroBatch:
        import torch

        from bigbatch.batch import MicroBatch

        return MicroBatch(torch.randint(0, vocab_size, (rows, seq_len), device=device),
                          torch.randint(0, vocab_size, (rows, seq_len), device=device))


LM = LanguageModelling()
