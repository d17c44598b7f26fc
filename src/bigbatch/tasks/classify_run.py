"""`train()` for `train.task = "classify"`: labelled texts and a Hugging Face classifier wired into
the same `fit()` and `train_step()` as language modelling. run.py dispatches here.

Outputs beside the usual metrics.jsonl/config.toml/checkpoints: `labels.json` (label id -> name,
written before training) and, at the end, the model in Hugging Face's own format (config.json,
model.safetensors, tokenizer files) in the run directory, so `from_pretrained(RUN_DIR)` loads it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bigbatch.batch_schedule import BatchSchedule
from bigbatch.batching import plan_batch
from bigbatch.checkpoint import Checkpointer
from bigbatch.config import Config
from bigbatch.config_files import config_to_toml
from bigbatch.data.classification import (
    ClassificationLoader,
    Windows,
    eval_batches,
    label_ids,
    label_names,
    read_labelled_file,
    tokenize_windows,
)
from bigbatch.distributed import dist_info_from_env, init_process_group, shutdown
from bigbatch.engine.loop import TrainState, fit
from bigbatch.engine.optim import build_optimizer
from bigbatch.errors import UsageError
from bigbatch.hf.models import (
    apply_hf_checkpointing,
    build_hf_model,
    describe_hf_model,
    load_tokenizer,
    parse_source,
)
from bigbatch.metrics import MetricsLog, Progress
from bigbatch.parallel import full_model_state_dict, parallelize
from bigbatch.precision import make_precision
from bigbatch.preemption import Preemption, any_rank
from bigbatch.resume import check_out_dir, drop_metrics_after, find_resume_checkpoint
from bigbatch.tasks.classify import (
    classification_loss_sum,
    evaluate_classifier,
    sequence_plan,
)


@dataclass
class ClassifyResult:
    out_dir: Path
    state: TrainState
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's
    num_parameters: int = 0
    exit_code: int = 0


@dataclass
class LabelledSplits:
    train: Windows
    val: Windows
    labels: list[str]


def hold_out(num_texts: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) text indices: a seeded random `fraction` held out (at least one)."""
    order = np.random.default_rng(seed).permutation(num_texts)
    num_val = max(1, round(num_texts * fraction))
    return np.sort(order[num_val:]), np.sort(order[:num_val])


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


def text_schedule(plan, max_steps: int) -> BatchSchedule:
    """fit()'s schedule for classification, counted in texts: every step is the full
    `global_sequences` (no ramp), so `tokens` in fit() and the LR schedule are texts, and the run
    is `max_steps` steps. (The real tokens of each step, for tokens/s, come from the loader.)"""
    per_rank = plan.global_sequences // plan.world_size
    texts = plan_batch(plan.global_sequences, 1, per_rank, plan.world_size)
    return BatchSchedule(texts, ramp="linear", ramp_tokens=0, start_micro_steps=1,
                         seq_len_start=1, seq_len_warmup_tokens=0, max_steps=max_steps)


def plan_windows_per_micro_batch(cfg: Config, dist, device: torch.device, out_dir: Path,
                                 say) -> Config:
    """`batch.micro_batch_size = "auto"`: the memory planner probes the model on micro-batches of
    full-length windows; the plan goes to `plan.json` as for language modelling."""
    from bigbatch.plan.planner import apply_plan, describe_plan, plan_for_config, write_plan

    memory_plan = plan_for_config(cfg, 0, world_size=dist.world_size, device=str(device))
    for line in describe_plan(memory_plan):
        say(f"plan: {line}")
    if dist.is_main:
        write_plan(memory_plan, out_dir)
    return apply_plan(cfg, memory_plan)


def train_classifier(cfg: Config, out_dir: Path, verbose: bool = True, resume: str | None = None,
                     preemption: Preemption | None = None) -> ClassifyResult:
    from bigbatch.run import close_run, prepare_out_dir, resolve_device, seed_everything, warn

    source = parse_source(cfg.model.source)
    if source is None:
        raise UsageError("train.task = \"classify\" needs a Hugging Face model: model.source = "
                         "hf:DIR or hf-config:FILE")
    if cfg.model.loss_chunk_tokens:
        raise UsageError("model.loss_chunk_tokens is for language modelling; set it to 0")
    if cfg.model.loss_kernel == "fused":
        raise UsageError("model.loss_kernel = 'fused' is for language modelling with the "
                         "built-in GPT; use 'auto' or 'standard'")
    dist = dist_info_from_env()
    device = resolve_device(cfg.train.device, dist)
    init_process_group(dist, device)
    if dist.is_main:
        prepare_out_dir(out_dir)
        check_out_dir(out_dir, resume)
    say = print if verbose and dist.is_main else (lambda *a, **k: None)
    if cfg.batch.micro_batch_size == "auto" and not cfg.batch.micro_batch_tokens:
        cfg = plan_windows_per_micro_batch(cfg, dist, device, out_dir, say)
    plan = sequence_plan(cfg.batch.global_sequences, cfg.batch.micro_batch_size,
                         cfg.batch.micro_batch_tokens, cfg.data.max_length, dist.world_size)
    resume_from = find_resume_checkpoint(resume, out_dir, warn) if resume else None

    started = time.perf_counter()
    tokenizer = load_tokenizer(source, cfg.data.tokenizer, cfg.model.trust_remote_code)
    splits = load_splits(cfg, tokenizer)
    say(f"data: {splits.train.num_docs:,} training texts ({len(splits.train.tokens):,} windows), "
        f"{splits.val.num_docs:,} validation texts; labels {splits.labels} "
        f"({time.perf_counter() - started:.1f}s)")
    seed_everything(cfg.train.seed)
    model = build_hf_model(source, "classify", trust_remote_code=cfg.model.trust_remote_code,
                           labels=splits.labels)
    if model.config.pad_token_id is None:  # e.g. GPT-2: the head finds the last real token by it
        model.config.pad_token_id = splits.train.pad_id
    model.to(device).train()  # from_pretrained returns eval mode: dropout must be on
    apply_hf_checkpointing(model, cfg.model.activation_checkpointing, cfg.model.checkpoint_every)
    say(describe_hf_model(model, source))
    say(f"batch: {plan.describe()}")
    say(f"precision: {cfg.precision.dtype} | device: {device} | threads: "
        f"{torch.get_num_threads()}")
    wrapped = parallelize(model, cfg.parallel.strategy, device, dist,
                          precision=cfg.precision.dtype,
                          fsdp_gradient_sync=cfg.parallel.fsdp_gradient_sync)
    optimizer = build_optimizer(model, cfg.optim, device)
    precision = make_precision(cfg.precision, device)
    loader = ClassificationLoader(splits.train, plan.global_sequences, plan.micro_batch_size,
                                  plan.micro_batch_tokens, dist.rank, dist.world_size,
                                  cfg.train.seed)
    val_batches = eval_batches(splits.val, plan.micro_batch_size, plan.micro_batch_tokens,
                               dist.rank, dist.world_size)
    last_metrics: dict[str, float] = {}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        last_metrics.update(evaluate_classifier(
            model, val_batches, doc_labels=torch.from_numpy(splits.val.labels),
            num_labels=len(splits.labels), aggregate=cfg.data.aggregate, precision=precision,
            dist=dist, device=device))
        return dict(last_metrics)

    if dist.is_main:
        (out_dir / "config.toml").write_text(config_to_toml(cfg))
        (out_dir / "labels.json").write_text(json.dumps(dict(enumerate(splits.labels)), indent=1))
    checkpointer = Checkpointer(out_dir, cfg, model=wrapped, optimizer=optimizer,
                                scaler=precision.scaler, loader=loader, dist=dist, device=device,
                                say=say)
    checkpointer.remove_partial_saves()
    state = TrainState()
    if resume_from is not None:
        checkpointer.restore(resume_from, state)
        say(f"resumed from {resume_from} at step {state.step}")
    if resume and dist.is_main:
        drop_metrics_after(out_dir / "metrics.jsonl", state.step if resume_from else -1)
    log = MetricsLog(out_dir, enabled=dist.is_main)
    progress = Progress(cfg.train.max_steps, state.step, cfg.train.log_every,
                        enabled=verbose and dist.is_main)
    preemption = preemption or Preemption()
    num_parameters = sum(p.numel() for p in model.parameters())
    try:
        with preemption.handling_signals():
            state = fit(wrapped, optimizer, loader, val_batches, cfg=cfg,
                        schedule=text_schedule(plan, cfg.train.max_steps),
                        precision=precision, dist=dist, device=device, state=state, log=log,
                        progress=progress, on_step_end=checkpointer.maybe_save,
                        loss_sum_fn=classification_loss_sum, evaluate_fn=evaluate,
                        should_stop=lambda: any_rank(preemption.requested, dist, device))
            if state.step < cfg.train.max_steps:  # a signal stopped the loop early
                path = checkpointer.save_unless_saved(state)
                say(f"stopped by {preemption.signal_name} after step {state.step}: checkpoint "
                    f"{path}; to continue, run the same command with --resume auto --out "
                    f"{out_dir}")
                return ClassifyResult(out_dir, state, dict(last_metrics), num_parameters,
                                      preemption.exit_code)
    except UsageError as err:
        raise UsageError(f"{err}; {checkpointer.last_checkpoint_note()}") from None
    finally:
        progress.close()
        log.close()
    weights = full_model_state_dict(wrapped)  # a collective under FSDP: every rank calls it
    if dist.is_main:
        model.save_pretrained(str(out_dir), state_dict=weights)
        tokenizer.save_pretrained(str(out_dir))
        say(f"done in {time.perf_counter() - started:.0f}s: {state.step} steps, "
            f"{state.tokens_seen:,} tokens, {state.skipped_steps} skipped steps")
        say(f"validation: accuracy {last_metrics['val_accuracy']:.4f}, macro-F1 "
            f"{last_metrics['val_macro_f1']:.4f}, loss {last_metrics['val_loss']:.4f} "
            f"({splits.val.num_docs} texts, window logits aggregated by {cfg.data.aggregate})")
        say(f"outputs: {out_dir}/ (Hugging Face model + tokenizer, labels.json, metrics.jsonl, "
            "config.toml)")
        close_run(out_dir, "finished", say, None)  # no unigram baseline for labels
    shutdown(dist)
    return ClassifyResult(out_dir, state, dict(last_metrics), num_parameters)
