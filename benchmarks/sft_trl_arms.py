"""The child processes of benchmarks/bench_sft_trl.py, one arm each, so each arm's peak memory is
its own: `python benchmarks/sft_trl_arms.py ARM SPEC.json RESULT.json`.

ARM is `bigbatch` or `trl` (train from the spec's initial weights, save the final model to
SPEC.scratch/ARM/final), `evaluate` (score every final model with sft_trl_shared's one validation
loss and exact match), or `gradients` (the accumulation check, both tools, k = 1 and 8).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import sft_trl_shared as shared


def train_bigbatch(spec: dict) -> dict:
    from bigbatch.batch import IGNORE_INDEX, split_batch
    from bigbatch.config.files import load_config
    from bigbatch.model.hf import parse_source
    from bigbatch.run.train import train
    from bigbatch.tasks.sft.loader import SFTLoader
    from bigbatch.tasks.sft.wiring import load_data

    out = Path(spec["scratch"]) / "bigbatch"
    args = ["--train.task=sft", f"--model.source=hf:{spec['model_dir']}",
            f"--data.tokenizer={spec['model_dir']}", f"--data.path={spec['train_jsonl']}",
            f"--data.val_path={spec['val_jsonl']}", f"--data.seq_len={spec['seq_len']}",
            "--data.eval_generations=0", "--train.eval_every=0", "--train.eval_tokens=256",
            f"--batch.global_tokens={spec['global_rows'] * spec['seq_len']}",
            f"--batch.micro_batch_size={spec['micro_rows']}", "--batch.ramp=linear",
            "--optim.name=adamw", f"--optim.lr={spec['lr']}",
            f"--optim.warmup_steps={spec['warmup']}", "--optim.decay=cosine",
            "--optim.min_lr_ratio=0", f"--optim.weight_decay={spec['weight_decay']}",
            f"--optim.beta1={spec['beta1']}", f"--optim.beta2={spec['beta2']}",
            f"--optim.eps={spec['eps']}", f"--optim.clip_norm={spec['clip']}",
            f"--precision.dtype={'bf16' if spec['device'] == 'cuda' else 'fp32'}",
            f"--train.device={spec['device']}", "--checkpoint.every_minutes=0",
            f"--train.max_steps={spec['steps']}", f"--train.seed={spec['seed']}"]
    cfg = load_config(None, args)
    train(cfg, out, verbose=False)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "step_seconds" in r]
    # The real (not padding) tokens of each step: the same rows train() drew, drawn again. A
    # row's last segment is padding when none of its targets carries a loss (every example's
    # end of text does).
    data = load_data(cfg, parse_source(cfg.model.source))
    loader = SFTLoader(data.train, split_batch(cfg.batch.global_tokens, cfg.data.seq_len,
                                               cfg.batch.micro_batch_size, 1), 0, cfg.train.seed)
    real = []
    for _ in steps:
        count = 0
        for mb in loader.next_step():
            for positions, targets in zip(mb.position_ids, mb.targets, strict=True):
                last = int((positions == 0).nonzero().max())
                tail_is_padding = last > 0 and bool((targets[last:] == IGNORE_INDEX).all())
                count += last if tail_is_padding else len(positions)
        real.append(count)
    return {"step_seconds": [r["step_seconds"] for r in steps], "step_tokens": real,
            "final_train_loss": steps[-1]["loss"], "final_dir": str(out),
            **cuda_peak(spec)}


def trl_config(spec: dict, out: Path, **overrides):
    from trl import SFTConfig

    settings = dict(
        output_dir=str(out), max_steps=spec["steps"], per_device_train_batch_size=spec["micro_rows"],
        gradient_accumulation_steps=spec["global_rows"] // spec["micro_rows"],
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=spec["warmup"],
        weight_decay=spec["weight_decay"], adam_beta1=spec["beta1"], adam_beta2=spec["beta2"],
        adam_epsilon=spec["eps"], max_grad_norm=spec["clip"], optim="adamw_torch",
        packing=True, packing_strategy="bfd", padding_free=True, completion_only_loss=True,
        max_length=spec["seq_len"], seed=spec["seed"], data_seed=spec["seed"],
        bf16=spec["device"] == "cuda", use_cpu=spec["device"] == "cpu", report_to="none",
        save_strategy="no", eval_strategy="no", logging_steps=max(1, spec["steps"] // 4),
        dataloader_num_workers=0, disable_tqdm=True,
        # SFTConfig's default is True; bigbatch recomputes nothing unless asked
        # (model.activation_checkpointing): the same compute and memory trade on both sides.
        gradient_checkpointing=False)
    return SFTConfig(**{**settings, **overrides})


class StepTimer:
    """Seconds and real tokens of each optimizer step (TRL counts the unpadded input tokens)."""

    def __init__(self, trainer) -> None:
        self.trainer, self.seconds, self.tokens, self._began, self._seen = trainer, [], [], 0.0, 0

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer._began = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.seconds.append(time.perf_counter() - timer._began)
                total = timer.trainer._total_train_tokens
                timer.tokens.append(total - timer._seen)
                timer._seen = total

        return Timer()


def train_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    out = Path(spec["scratch"]) / "trl"
    rows = [json.loads(line) for line in Path(spec["train_jsonl"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["response"]}
                                          for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=trl_config(spec, out), train_dataset=dataset,
                         processing_class=tokenizer)
    timer = StepTimer(trainer)
    trainer.add_callback(timer.callback())
    result = trainer.train()
    trainer.save_model(str(out / "final"))
    return {"step_seconds": timer.seconds, "step_tokens": timer.tokens,
            "final_train_loss": result.training_loss, "final_dir": str(out / "final"),
            **cuda_peak(spec)}


def cuda_peak(spec: dict) -> dict:
    if spec["device"] != "cuda":
        return {}
    return {"cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20}


def evaluate(spec: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = [json.loads(line) for line in Path(spec["val_jsonl"]).read_text().splitlines()]
    scores = {}
    for arm, final in spec["finals"].items():
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).to(spec["device"])
        scores[arm] = {"val_loss": shared.validation_loss(model, tokenizer, rows),
                       "exact_match": shared.exact_match(model, tokenizer, rows)}
    # The arms tokenize alike where TRL's joint prompt+completion ids equal ours (separate).
    differ = sum(tokenizer(r["prompt"] + r["response"])["input_ids"]
                 != sum(shared.encode(tokenizer, r), [])[:-1] for r in rows)
    return {"scores": scores, "val_rows": len(rows), "tokenized_differently": differ}


if __name__ == "__main__":
    from sft_trl_gradients import gradients

    arm, spec_path, result_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    torch.manual_seed(spec["seed"])
    run = {"bigbatch": train_bigbatch, "trl": train_trl, "evaluate": evaluate,
           "gradients": gradients}[arm]
    Path(result_path).write_text(json.dumps(run(spec)))
