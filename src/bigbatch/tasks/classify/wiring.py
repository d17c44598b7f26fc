"""The wiring of `train.task = "classify"`: labelled texts and a Hugging Face classifier, wired
by the same `train()` into the same `fit()` and `train_step()` as language modelling.

Outputs beside the usual metrics.jsonl/config.toml/checkpoints: `labels.json` (label id -> name,
written before training) and, at the end, the model in Hugging Face's own format (config.json,
model.safetensors, tokenizer files) in the run directory, so `from_pretrained(RUN_DIR)` loads it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigbatch.batch import split_batch
from bigbatch.config.sections import Config
from bigbatch.engine.batch_schedule import BatchSchedule
from bigbatch.engine.loop import TrainState
from bigbatch.engine.noise_scale import noise_scale_summary
from bigbatch.engine.seeding import seed_everything, seed_rank_streams
from bigbatch.errors import UsageError
from bigbatch.model.adapters import (
    apply_adapter,
    base_model,
    describe_parameters,
    is_adapted,
    parameter_counts,
)
from bigbatch.model.hf import (
    apply_hf_checkpointing,
    build_hf_model,
    describe_hf_model,
    load_tokenizer,
    parse_source,
)
from bigbatch.tasks.base import TaskContext, TaskRun, hold_out
from bigbatch.tasks.classify.batch import split_text_batch
from bigbatch.tasks.classify.data import (
    ClassificationLoader,
    Windows,
    eval_batches,
    label_ids,
    label_names,
    read_labelled_file,
    tokenize_windows,
)
from bigbatch.tasks.classify.loss import classification_loss_sum, evaluate_classifier

# The Task's model_head (tasks/classify/__init__.py), said here too: that module imports this one.
MODEL_HEAD = "sequence-classification"


@dataclass
class LabelledSplits:
    train: Windows
    val: Windows
    labels: list[str]


def first_texts_within(windows_tokens: list[int], doc_start: np.ndarray, budget: int) -> int:
    """How many leading texts fit `budget` tokens (at least one): the fixed validation set."""
    per_doc = np.add.reduceat(np.asarray(windows_tokens), doc_start[:-1])
    return max(1, int(np.searchsorted(np.cumsum(per_doc), budget, side="right")))


def load_splits(cfg: Config, tokenizer) -> LabelledSplits:
    data = cfg.data
    if not data.path:
        raise UsageError("train.task = \"classify\" needs data.path: a .tsv, .csv or .jsonl file "
                         "of labelled texts")
    train_path = Path(data.path).expanduser()
    texts, raw = read_labelled_file(train_path, data.text_field, data.label_field)
    names = label_names(raw)
    if len(names) < 2:
        raise UsageError(f"{str(train_path)!r} has {len(names)} distinct label(s) in "
                         f"{data.label_field!r}: classification needs at least 2")
    ids = label_ids(raw, names, train_path)
    if data.val_path:
        val_path = Path(data.val_path).expanduser()
        val_texts, val_raw = read_labelled_file(val_path, data.text_field, data.label_field)
        val_ids = label_ids(val_raw, names, val_path)
    else:
        keep, held = hold_out(len(texts), data.val_fraction, cfg.train.seed)
        val_texts, val_ids = [texts[i] for i in held], ids[held]
        texts, ids = [texts[i] for i in keep], ids[keep]
    train = tokenize_windows(tokenizer, texts, ids, data.max_length, data.stride)
    val = tokenize_windows(tokenizer, val_texts, val_ids, data.max_length, data.stride)
    count = first_texts_within([len(t) for t in val.tokens], val.doc_start, cfg.train.eval_tokens)
    if count < val.num_docs:  # a fixed prefix of the split, like the lm task's eval_tokens
        val = tokenize_windows(tokenizer, val_texts[:count], val_ids[:count], data.max_length,
                               data.stride)
    return LabelledSplits(train, val, names)


def noise_applies(train: Windows) -> str | None:
    """None when every training text is one window, so a batch's examples are whole,
    independent texts and its size (the weight sum) is a count of texts; otherwise why the
    gradient noise scale is not measured."""
    split = int(np.count_nonzero(np.diff(train.doc_start) > 1))
    if not split:
        return None
    return (f"gradient noise scale: not measured: {split:,} of the {train.num_docs:,} training "
            "texts span several windows (data.max_length), and overlapping windows of one text "
            "are not independent samples")


def text_schedule(split, max_steps: int) -> BatchSchedule:
    """fit()'s schedule for classification, counted in texts: every step is the full
    `global_sequences` (no ramp), so `tokens` in fit() and the LR schedule are texts, and the run
    is `max_steps` steps. (The real tokens of each step, for tokens/s, come from the loader.)"""
    per_rank = split.global_sequences // split.world_size
    texts = split_batch(split.global_sequences, 1, per_rank, split.world_size)
    return BatchSchedule(texts, ramp="linear", ramp_tokens=0, start_micro_steps=1,
                         seq_len_start=1, seq_len_warmup_tokens=0, max_steps=max_steps)


def prepare(cfg: Config, ctx: TaskContext) -> TaskRun:
    source = parse_source(cfg.model.source)
    if source is None:
        raise UsageError("train.task = \"classify\" needs a Hugging Face model: model.source = "
                         "hf:DIR or hf-config:FILE")
    if cfg.model.loss_chunk_tokens:
        raise UsageError("model.loss_chunk_tokens is for language modelling; set it to 0")
    if not cfg.data.packing:
        raise UsageError("data.packing = false is for train.task = 'sft'; classify always pads "
                         "each micro-batch to its longest window: set it true")
    if cfg.model.loss_kernel == "fused":
        raise UsageError("model.loss_kernel = 'fused' is for language modelling with the "
                         "built-in GPT; use 'auto' or 'standard'")
    dist, device, say = ctx.dist, ctx.device, ctx.say
    if cfg.batch.micro_batch_size == "auto" and not cfg.batch.micro_batch_tokens:
        cfg = ctx.plan_micro_batch(cfg, 0, 0)
    split = split_text_batch(cfg.batch.global_sequences, cfg.batch.micro_batch_size,
                         cfg.batch.micro_batch_tokens, cfg.data.max_length, dist.world_size)
    started = time.perf_counter()
    tokenizer = load_tokenizer(source, cfg.data.tokenizer, cfg.model.trust_remote_code)
    splits = load_splits(cfg, tokenizer)
    say(f"data: {splits.train.num_docs:,} training texts ({len(splits.train.tokens):,} windows), "
        f"{splits.val.num_docs:,} validation texts; labels {splits.labels} "
        f"({time.perf_counter() - started:.1f}s)")
    seed_everything(cfg.train.seed)
    model = build_hf_model(source, MODEL_HEAD, trust_remote_code=cfg.model.trust_remote_code,
                           labels=splits.labels, say=say)
    if model.config.pad_token_id is None:  # e.g. GPT-2: the head finds the last real token by it
        model.config.pad_token_id = splits.train.pad_id
    model.to(device).train()  # from_pretrained returns eval mode: dropout must be on
    seed_rank_streams(cfg.train.seed, dist.rank)
    apply_hf_checkpointing(model, cfg.model.activation_checkpointing, cfg.model.checkpoint_every)
    model = apply_adapter(model, cfg.model, MODEL_HEAD)  # seeded: LoRA's A is drawn at random
    loader = ClassificationLoader(splits.train, split.global_sequences, split.micro_batch_size,
                                  split.micro_batch_tokens, dist.rank, dist.world_size,
                                  cfg.train.seed)
    val_batches = eval_batches(splits.val, split.micro_batch_size, split.micro_batch_tokens,
                               dist.rank, dist.world_size)
    if dist.is_main:
        (ctx.out_dir / "labels.json").write_text(json.dumps(dict(enumerate(splits.labels)),
                                                            indent=1))
    last_metrics: dict[str, float] = {}

    def evaluate(model: nn.Module) -> dict[str, float]:
        last_metrics.update(evaluate_classifier(
            model, val_batches, doc_labels=torch.from_numpy(splits.val.labels),
            num_labels=len(splits.labels), aggregate=cfg.data.aggregate,
            precision=ctx.precision, dist=dist, device=device))
        return dict(last_metrics)

    def save(model: nn.Module, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        # Adapted: peft keeps only the adapters' and the head's weights of `weights`.
        model.save_pretrained(str(out_dir), state_dict=weights)
        tokenizer.save_pretrained(str(out_dir))

    def end_lines(state: TrainState) -> list[str]:
        return [f"validation: accuracy {last_metrics['val_accuracy']:.4f}, macro-F1 "
                f"{last_metrics['val_macro_f1']:.4f}, loss {last_metrics['val_loss']:.4f} "
                f"({splits.val.num_docs} texts, window logits aggregated by "
                f"{cfg.data.aggregate})",
                noise_applies(splits.train) or noise_scale_summary(
                    split.global_sequences, state.noise.noise_scale, unit="texts"),
                f"outputs: {ctx.out_dir}/ ("
                + ("peft adapter (bigbatch export --merge for a plain model)"
                   if is_adapted(model) else "Hugging Face model")
                + " + tokenizer, labels.json, metrics.jsonl, config.toml)"]

    return TaskRun(
        cfg=cfg, schedule=text_schedule(split, cfg.train.max_steps), model=model, loader=loader,
        start_lines=[describe_hf_model(base_model(model), source),
                                              describe_parameters(model),
                                              f"batch: {split.describe()}"],
        save=save, end_lines=end_lines, loss_sum_fn=classification_loss_sum, evaluate=evaluate,
        measure_noise=noise_applies(splits.train) is None,
        num_parameters=parameter_counts(model)[1],
        num_trainable_parameters=parameter_counts(model)[0])
