"""The wiring of `train.task = "lm"`: the corpus, the model (the built-in GPT or a Hugging Face
causal LM), the loss and the evaluation; ends by comparing the validation loss with a unigram
model's."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
from torch import nn

from bigbatch.batch import IGNORE_INDEX, split_batch
from bigbatch.config.sections import Config
from bigbatch.data.corpus import Corpus, prepare_corpus_in_child
from bigbatch.data.loader import TokenLoader, eval_micro_batches
from bigbatch.engine.batch_schedule import BatchSchedule, build_batch_schedule, describe_schedule
from bigbatch.engine.chunked_loss import describe_loss, make_loss_sum_fn
from bigbatch.engine.fused_loss import resolve_loss_kernel
from bigbatch.engine.loop import TrainState, evaluate
from bigbatch.engine.noise_scale import noise_scale_summary
from bigbatch.engine.seeding import seed_everything, seed_rank_streams
from bigbatch.engine.throughput import flops_per_token
from bigbatch.errors import UsageError
from bigbatch.model.adapters import (
    apply_adapter,
    base_model,
    describe_parameters,
    is_adapted,
    parameter_counts,
)
from bigbatch.model.artifacts import save_model
from bigbatch.model.checkpointing import apply_activation_checkpointing
from bigbatch.model.gpt import GPT, GPTShape, resolve_attention
from bigbatch.optim.schedule import describe_lr_scaling
from bigbatch.parallel.process_group import DistInfo
from bigbatch.tasks.base import TaskContext, TaskRun

# The Task's model_head (tasks/lm/__init__.py), said here too: that module imports this one.
MODEL_HEAD = "causal-lm"


def build_model(cfg: Config, vocab_size: int, device_type: str = "cpu") -> nn.Module:
    """The built-in GPT, or the Hugging Face causal LM that `model.source` names, with the
    adapters `model.adapter` asks for (a peft model around it)."""
    from bigbatch.model.hf_lm import build_hf_lm, with_model_tokenizer

    cfg, source = with_model_tokenizer(cfg)
    if source is not None:
        return apply_adapter(build_hf_lm(cfg, source, vocab_size), cfg.model, MODEL_HEAD)
    gpt = GPT(GPTShape(vocab_size=vocab_size, seq_len=cfg.data.seq_len, n_layer=cfg.model.n_layer,
                       n_head=cfg.model.n_head, d_model=cfg.model.d_model,
                       dropout=cfg.model.dropout),
              attention=resolve_attention(cfg.model.attention, device_type, cfg.precision.dtype))
    return apply_adapter(gpt, cfg.model, MODEL_HEAD)


def model_width(cfg: Config) -> tuple[int, int]:
    """(layers, width) of the built-in GPT, or of the Hugging Face model from its config."""
    if cfg.model.source == "gpt":
        return cfg.model.n_layer, cfg.model.d_model
    from bigbatch.model.hf import parse_source, text_dims

    dims = text_dims(parse_source(cfg.model.source), cfg.model.trust_remote_code)
    return dims["n_layer"], dims["d_model"]


def unigram_baseline(corpus: Corpus, cfg: Config) -> float:
    """The unigram model's loss on exactly the windows `evaluate` scores (all ranks' share)."""
    batches = eval_micro_batches(corpus.val_tokens, corpus.eot_id, cfg.data.seq_len,
                                 cfg.train.eval_tokens, micro_batch_size=64, rank=0, world_size=1)
    targets = torch.cat([mb.targets.flatten() for mb in batches])
    return corpus.unigram_loss(targets[targets != IGNORE_INDEX].numpy())


def load_corpus(cfg: Config, dist: DistInfo) -> Corpus:
    """Every rank asks for the cache; the first to take its file lock fills it (in a child
    process: see prepare_corpus_in_child) and the others wait on the lock, then read it. So one
    process prepares per cache directory: once per node on node-local disks, once in all on a
    shared one. No barrier: a long preparation would outlast the process group's timeout."""
    return prepare_corpus_in_child(cfg.data)


def startup_lines(cfg: Config, schedule: BatchSchedule, model: nn.Module) -> list[str]:
    split, base, (_, total) = schedule.full_batch, base_model(model), parameter_counts(model)
    return [
        f"model: {cfg.model.source} {total / 1e6:.2f}M parameters"
        if not isinstance(base, GPT) else
        f"model: GPT {total / 1e6:.2f}M parameters ({cfg.model.n_layer} layers,"
        f" d_model {cfg.model.d_model}, {cfg.model.n_head} heads, vocab {base.shape.vocab_size})",
        describe_parameters(model),
        f"batch: {split.describe()}",
        f"schedule: {cfg.train.max_steps} steps = {schedule.total_tokens:,} "
        f"tokens, peak lr {cfg.optim.lr:g} after {cfg.optim.warmup_steps} warmup steps, "
        f"{cfg.optim.decay} decay to {cfg.optim.lr * cfg.optim.min_lr_ratio:g}"
        + (" (counted in tokens, in steps of the full batch)" if schedule.ramps else ""),
        f"optimizer: {cfg.optim.name} | " + describe_lr_scaling(
            cfg.optim.lr, cfg.optim.lr_scaling, split.global_tokens,
            cfg.optim.reference_batch_tokens or split.global_tokens),
        *describe_schedule(schedule),
    ]


def prepare(cfg: Config, ctx: TaskContext) -> TaskRun:
    from bigbatch.model.hf_lm import save_hf_model, with_model_tokenizer

    if not cfg.data.packing:
        raise UsageError("data.packing = false is for train.task = 'sft' (whole examples, "
                         "padded); a language model trains on windows of its corpus: set true")
    cfg, hf_source = with_model_tokenizer(cfg)  # a Hugging Face LM tokenizes with its own
    dist, device, say = ctx.dist, ctx.device, ctx.say
    auto_micro_batch = cfg.batch.micro_batch_size == "auto"  # planned once the vocab is known
    if not auto_micro_batch:  # checked before the corpus is read: a bad batch fails fast
        split_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size,
                   dist.world_size)
    started = time.perf_counter()
    corpus = load_corpus(cfg, dist)
    say(f"data: {len(corpus.train_tokens):,} training and {len(corpus.val_tokens):,} validation "
        f"tokens ({time.perf_counter() - started:.1f}s; cache {corpus.cache_dir})")
    if auto_micro_batch:
        data_bytes = corpus.train_tokens.nbytes + corpus.val_tokens.nbytes
        cfg = ctx.plan_micro_batch(cfg, corpus.vocab_size, data_bytes)
    split = split_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size,
                      dist.world_size)
    schedule = build_batch_schedule(cfg, split)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, corpus.vocab_size, device.type).to(device)
    seed_rank_streams(cfg.train.seed, dist.rank)
    loss_kernel = "standard"
    if hf_source is None:  # a Hugging Face model's own switch was set by build_model
        apply_activation_checkpointing(model, cfg.model.activation_checkpointing,
                                       cfg.model.checkpoint_every)  # before compile and DDP/FSDP
        loss_kernel = resolve_loss_kernel(cfg.model.loss_kernel, corpus.vocab_size,
                                          cfg.parallel.strategy, dist.world_size, device.type)
    loss_sum_fn = make_loss_sum_fn(cfg.model.loss_chunk_tokens, loss_kernel)
    loader = TokenLoader(corpus.train_tokens, corpus.eot_id, split, dist.rank, cfg.train.seed,
                         cfg.data.document_mask)
    val_batches = eval_micro_batches(corpus.val_tokens, corpus.eot_id, cfg.data.seq_len,
                                     cfg.train.eval_tokens, cfg.batch.micro_batch_size,
                                     dist.rank, dist.world_size, cfg.data.document_mask)

    @functools.cache
    def baseline() -> float:  # once per run: the end lines and run_info both report it
        return unigram_baseline(corpus, cfg)

    def save(model: nn.Module, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        if hf_source is not None:
            save_hf_model(model, cfg, hf_source, out_dir, weights)
        elif is_adapted(model):  # merged for everything that reads a GPT; the adapter beside
            adapted = build_model(cfg, corpus.vocab_size)
            adapted.load_state_dict(weights)
            adapted.save_pretrained(str(out_dir))
            save_model(adapted.merge_and_unload(), corpus.tokenizer, out_dir)
        else:
            save_model(model, corpus.tokenizer, out_dir, weights)

    def end_lines(state: TrainState) -> list[str]:
        lines = []
        if getattr(loss_sum_fn, "compile_seconds", None):  # the fused loss kernel
            lines.append(f"fused loss kernel: first call (compiling) took "
                         f"{loss_sum_fn.compile_seconds:.1f}s; later runs reuse the inductor "
                         "cache")
        return [*lines,
                noise_scale_summary(state.batch_tokens, state.noise.noise_scale,
                                    ramp=schedule.ramp if schedule.ramps_batch else "",
                                    first_batch_tokens=state.first_batch_tokens,
                                    full_batch_tokens=split.global_tokens),
                f"validation loss {state.last_val_loss:.4f} nats/token vs "
                f"{baseline():.4f} for a unigram model (one that learned "
                "only the training token frequencies) on the same validation windows",
                f"outputs: {ctx.out_dir}/ (model.safetensors, metrics.jsonl, config.toml"
                + (", tensorboard/" if "tensorboard" in cfg.train.trackers else "") + ")"]

    def validation_loss(model: nn.Module) -> dict[str, float]:
        return {"val_loss": evaluate(model, val_batches, ctx.precision, dist, device,
                                     loss_sum_fn)}

    return TaskRun(
        cfg=cfg, schedule=schedule, model=model, loader=loader, evaluate=validation_loss,
        start_lines=[*startup_lines(cfg, schedule, model),
                     f"loss: {describe_loss(loss_kernel, cfg.model.loss_chunk_tokens)}",
                     *(["attention: within each document of a packed row, positions restart "
                        "at each (data.document_mask)"] if cfg.data.document_mask else [])],
        save=save, end_lines=end_lines, loss_sum_fn=loss_sum_fn,
        num_parameters=parameter_counts(model)[1],
        num_trainable_parameters=parameter_counts(model)[0],
        flops_per_token=flops_per_token(*model_width(cfg), corpus.vocab_size, cfg.data.seq_len),
        closing_facts=lambda: {"unigram_val_loss": baseline()})
