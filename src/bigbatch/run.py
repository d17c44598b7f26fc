"""`train()`: wires plain objects together (config -> data, model, optimizer, precision) and calls
`fit()`. No training arithmetic lives here; it is all in engine/step.py and engine/loop.py.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigbatch.activation_checkpointing import apply_activation_checkpointing
from bigbatch.allocator import tune_glibc_malloc
from bigbatch.artifacts import save_model, unwrap
from bigbatch.batch_schedule import BatchSchedule, build_batch_schedule, describe_schedule
from bigbatch.batching import plan_batch
from bigbatch.checkpoint import Checkpointer
from bigbatch.config import Config
from bigbatch.config_files import config_to_toml
from bigbatch.data.corpus import Corpus, prepare_corpus_in_child
from bigbatch.data.loader import TokenLoader, eval_micro_batches
from bigbatch.data.packing import IGNORE_INDEX
from bigbatch.distributed import (
    DistInfo,
    dist_info_from_env,
    init_process_group,
    shutdown,
)
from bigbatch.engine.chunked_loss import describe_loss, make_loss_sum_fn
from bigbatch.engine.fused_loss import resolve_loss_kernel
from bigbatch.engine.loop import TrainState, finished, fit
from bigbatch.engine.noise_scale import NoiseScaleEMA, noise_scale_summary
from bigbatch.engine.optim import build_optimizer
from bigbatch.engine.schedule import describe_lr_scaling
from bigbatch.errors import UsageError
from bigbatch.metrics import MetricsLog, Progress
from bigbatch.model import GPT, GPTShape, resolve_attention
from bigbatch.parallel import full_model_state_dict, parallelize
from bigbatch.precision import make_precision
from bigbatch.preemption import Preemption, any_rank
from bigbatch.resume import check_out_dir, drop_metrics_after, find_resume_checkpoint
from bigbatch.run_info import end_run_info, flops_per_token, start_run_info


@dataclass
class TrainResult:
    out_dir: Path
    state: TrainState
    unigram_loss: float  # validation loss of a model that learned only token frequencies
    num_parameters: int
    exit_code: int = 0  # 128 + signal number when a signal stopped the run early


def unigram_baseline(corpus: Corpus, cfg: Config) -> float:
    """The unigram model's loss on exactly the windows `evaluate` scores (all ranks' share)."""
    batches = eval_micro_batches(corpus.val_tokens, corpus.eot_id, cfg.data.seq_len,
                                 cfg.train.eval_tokens, micro_batch_size=64, rank=0, world_size=1)
    targets = torch.cat([mb.targets.flatten() for mb in batches])
    return corpus.unigram_loss(targets[targets != IGNORE_INDEX].numpy())


def resolve_device(name: str, dist: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{dist.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device = {name!r} but this torch has no CUDA device: use cpu "
                         "or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: Config, vocab_size: int, device_type: str = "cpu") -> nn.Module:
    """The built-in GPT, or the Hugging Face causal LM that `model.source` names."""
    from bigbatch.hf.lm import build_hf_lm, with_model_tokenizer

    cfg, source = with_model_tokenizer(cfg)
    if source is not None:
        return build_hf_lm(cfg, source, vocab_size)
    return GPT(GPTShape(vocab_size=vocab_size, seq_len=cfg.data.seq_len, n_layer=cfg.model.n_layer,
                        n_head=cfg.model.n_head, d_model=cfg.model.d_model,
                        dropout=cfg.model.dropout),
               attention=resolve_attention(cfg.model.attention, device_type,
                                             cfg.precision.dtype))


def model_width(cfg: Config) -> tuple[int, int]:
    """(layers, width) of the built-in GPT, or of the Hugging Face model from its config."""
    if cfg.model.source == "gpt":
        return cfg.model.n_layer, cfg.model.d_model
    from bigbatch.hf.probe import hf_dims

    dims = hf_dims(cfg, cfg.data.seq_len)
    return dims.n_layer, dims.d_model


def plan_memory(cfg: Config, corpus: Corpus, dist: DistInfo, device: torch.device,
                out_dir: Path, say) -> Config:
    """Resolve `batch.micro_batch_size = "auto"` (and checkpointing/chunked loss) by the memory
    planner; the plan goes to `plan.json` in the run directory."""
    from bigbatch.plan.planner import apply_plan, describe_plan, plan_for_config, write_plan

    data_bytes = corpus.train_tokens.nbytes + corpus.val_tokens.nbytes
    memory_plan = plan_for_config(cfg, corpus.vocab_size, world_size=dist.world_size,
                                  device=str(device), data_bytes=data_bytes)
    for line in describe_plan(memory_plan):
        say(f"plan: {line}")
    if dist.is_main:
        write_plan(memory_plan, out_dir)
    return apply_plan(cfg, memory_plan)


def load_corpus(cfg: Config, dist: DistInfo) -> Corpus:
    """Every rank asks for the cache; the first to take its file lock fills it (in a child
    process: see prepare_corpus_in_child) and the others wait on the lock, then read it. So one
    process prepares per cache directory: once per node on node-local disks, once in all on a
    shared one. No barrier: a long preparation would outlast the process group's timeout."""
    return prepare_corpus_in_child(cfg.data)


def prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {str(out_dir)!r} is not writable: {err.strerror}") from None


def startup_lines(cfg: Config, schedule: BatchSchedule, model: nn.Module,
                  device: torch.device,
                  allocator: str) -> list[str]:
    plan = schedule.plan
    return [
        f"model: {cfg.model.source} {model.num_parameters() / 1e6:.2f}M parameters"
        if not isinstance(model, GPT) else
        f"model: GPT {model.num_parameters() / 1e6:.2f}M parameters ({cfg.model.n_layer} layers,"
        f" d_model {cfg.model.d_model}, {cfg.model.n_head} heads, vocab {model.shape.vocab_size})",
        f"batch: {plan.describe()}",
        f"precision: {cfg.precision.dtype} | device: {device} | threads: "
        f"{torch.get_num_threads()} | allocator: {allocator}",
        f"schedule: {cfg.train.max_steps} steps = {schedule.total_tokens:,} "
        f"tokens, peak lr {cfg.optim.lr:g} after {cfg.optim.warmup_steps} warmup steps, "
        f"{cfg.optim.decay} decay to {cfg.optim.lr * cfg.optim.min_lr_ratio:g}"
        + (" (counted in tokens, in steps of the full batch)" if schedule.ramps else ""),
        f"optimizer: {cfg.optim.name} | " + describe_lr_scaling(
            cfg.optim.lr, cfg.optim.lr_scaling, plan.global_tokens,
            cfg.optim.reference_batch_tokens or plan.global_tokens),
        *describe_schedule(schedule),
    ]


def warn(message: str) -> None:
    print(f"bigbatch: warning: {message}", file=sys.stderr, flush=True)


def close_run(out_dir: Path, ended: str, say, unigram_val_loss: float | None) -> None:
    """Close run_info.json's session and write report.html. The checkpoint or model is already
    on disk, so a failure here costs the run nothing: it is a warning, never an error.

    The report is drawn by a child process (`bigbatch report`): matplotlib and the rendered
    figures (~40 MB) then never raise the training process's peak memory, which the planner's
    `batch.memory_budget` bounds."""
    try:
        end_run_info(out_dir, ended, unigram_val_loss=unigram_val_loss)
        done = subprocess.run([sys.executable, "-m", "bigbatch", "report", str(out_dir)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
        say(f"report: {done.stdout.strip().splitlines()[-1]}")
    except Exception as err:  # any report bug must not turn a saved run into a failed one
        warn(f"could not write the run report: {type(err).__name__}: {err}")


def train(cfg: Config, out_dir: Path, verbose: bool = True, resume: str | None = None,
          preemption: Preemption | None = None) -> TrainResult:
    """Train `cfg` into `out_dir`; `resume` is "auto" or a checkpoint/run directory (--resume).
    SIGTERM/SIGINT stop after the current step with a checkpoint (see preemption.py)."""
    if cfg.train.task == "classify":
        from bigbatch.tasks.classify_run import train_classifier
        return train_classifier(cfg, out_dir, verbose, resume, preemption)
    from bigbatch.hf.lm import save_hf_model, with_model_tokenizer

    cfg, hf_source = with_model_tokenizer(cfg)  # a Hugging Face LM tokenizes with its own
    dist = dist_info_from_env()
    allocator = "system"
    if cfg.train.allocator == "tuned" and tune_glibc_malloc():
        allocator = "tuned (glibc: no per-buffer mmap, no trim)"
    device = resolve_device(cfg.train.device, dist)
    init_process_group(dist, device)
    auto_micro_batch = cfg.batch.micro_batch_size == "auto"  # planned once the vocab is known
    if not auto_micro_batch:
        plan = plan_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size,
                          dist.world_size)
    if dist.is_main:
        prepare_out_dir(out_dir)
        check_out_dir(out_dir, resume)
    resume_from = find_resume_checkpoint(resume, out_dir, warn) if resume else None
    say = print if verbose and dist.is_main else (lambda *a, **k: None)

    started, began = time.perf_counter(), time.time()
    corpus = load_corpus(cfg, dist)
    say(f"data: {len(corpus.train_tokens):,} training and {len(corpus.val_tokens):,} validation "
        f"tokens ({time.perf_counter() - started:.1f}s; cache {corpus.cache_dir})")
    if auto_micro_batch:
        cfg = plan_memory(cfg, corpus, dist, device, out_dir, say)
        plan = plan_batch(cfg.batch.global_tokens, cfg.data.seq_len, cfg.batch.micro_batch_size,
                          dist.world_size)
    schedule = build_batch_schedule(cfg, plan)
    seed_everything(cfg.train.seed)
    model = build_model(cfg, corpus.vocab_size, device.type).to(device)
    if hf_source is None:  # a Hugging Face model's own switch was set by build_model
        apply_activation_checkpointing(model, cfg.model.activation_checkpointing,
                                       cfg.model.checkpoint_every)  # before compile and DDP/FSDP
    loss_kernel = "standard"
    if hf_source is None:
        loss_kernel = resolve_loss_kernel(cfg.model.loss_kernel, corpus.vocab_size,
                                          cfg.parallel.strategy, dist.world_size)
    loss_sum_fn = make_loss_sum_fn(cfg.model.loss_chunk_tokens, loss_kernel)
    for line in startup_lines(cfg, schedule, model, device, allocator):
        say(line)
    say(f"loss: {describe_loss(loss_kernel, cfg.model.loss_chunk_tokens)}")
    wrapped = parallelize(model, cfg.parallel.strategy, device, dist)
    optimizer = build_optimizer(model, cfg.optim, device)
    precision = make_precision(cfg.precision, device)
    loader = TokenLoader(corpus.train_tokens, corpus.eot_id, plan, dist.rank, cfg.train.seed)
    val_batches = eval_micro_batches(corpus.val_tokens, corpus.eot_id, cfg.data.seq_len,
                                     cfg.train.eval_tokens, cfg.batch.micro_batch_size,
                                     dist.rank, dist.world_size)
    if dist.is_main:
        (out_dir / "config.toml").write_text(config_to_toml(cfg))
        start_run_info(out_dir, began=began, resumed=resume_from is not None, device=device,
                       world_size=dist.world_size, dtype_name=cfg.precision.dtype,
                       num_parameters=model.num_parameters(),
                       flops=flops_per_token(*model_width(cfg), corpus.vocab_size,
                                             cfg.data.seq_len))
    checkpointer = Checkpointer(out_dir, cfg, model=wrapped, optimizer=optimizer,
                                scaler=precision.scaler, loader=loader, dist=dist, device=device,
                                say=say)
    checkpointer.remove_partial_saves()
    state = TrainState(noise=NoiseScaleEMA(cfg.batch.noise_scale_ema))
    if resume_from is not None:
        checkpointer.restore(resume_from, state)
        say(f"resumed from {resume_from} at step {state.step}")
    elif resume:
        say(f"no checkpoint in {out_dir / 'checkpoints'}: starting at step 0")
    if resume and dist.is_main:  # rows past the checkpoint are about to be logged again
        drop_metrics_after(out_dir / "metrics.jsonl", state.step if resume_from else -1)
    log = MetricsLog(out_dir, enabled=dist.is_main)
    progress = Progress(schedule.num_steps(), state.step, cfg.train.log_every,
                        enabled=verbose and dist.is_main)
    preemption = preemption or Preemption()
    try:
        with preemption.handling_signals():  # also covers the checkpoint written on a signal
            state = fit(wrapped, optimizer, loader, val_batches, cfg=cfg, schedule=schedule,
                        precision=precision, dist=dist, device=device, state=state, log=log,
                        progress=progress, on_step_end=checkpointer.maybe_save,
                        loss_sum_fn=loss_sum_fn,
                        should_stop=lambda: any_rank(preemption.requested, dist, device))
            if getattr(loss_sum_fn, "compile_seconds", None):  # the fused loss kernel
                say(f"fused loss kernel: first call (compiling) took "
                    f"{loss_sum_fn.compile_seconds:.1f}s; later runs reuse the inductor cache")
            if not finished(state, schedule):  # a signal stopped the loop early
                path = checkpointer.save_unless_saved(state)
                say(f"stopped by {preemption.signal_name} after step {state.step}/"
                    f"{schedule.num_steps()}: checkpoint {path}")
                say(f"to continue, run the same command with --resume auto --out {out_dir}")
                baseline = unigram_baseline(corpus, cfg)
                if dist.is_main:
                    close_run(out_dir, preemption.signal_name, say, baseline)
                return TrainResult(out_dir, state, baseline, model.num_parameters(),
                                   preemption.exit_code)
    except UsageError as err:
        raise UsageError(f"{err}; {checkpointer.last_checkpoint_note()}") from None
    finally:
        progress.close()
        log.close()
    baseline = unigram_baseline(corpus, cfg)
    # Under FSDP gathering the full weights is a collective: every rank takes part, rank 0 writes.
    weights = full_model_state_dict(wrapped)
    if dist.is_main:
        if hf_source is None:
            save_model(unwrap(wrapped), corpus.tokenizer, out_dir, weights)
        else:
            save_hf_model(unwrap(wrapped), cfg, hf_source, out_dir, weights)
        say(f"done in {time.perf_counter() - started:.0f}s: {state.tokens_seen:,} tokens, "
            f"{state.skipped_steps} skipped steps")
        say(noise_scale_summary(state.micro_steps * schedule.unit_tokens, state.noise.noise_scale))
        say(f"validation loss {state.last_val_loss:.4f} nats/token vs {baseline:.4f} for a "
            "unigram model (one that learned only the training token frequencies) on the same "
            "validation windows")
        say(f"outputs: {out_dir}/ (model.safetensors, metrics.jsonl, config.toml, tensorboard/)")
        close_run(out_dir, "finished", say, baseline)
    shutdown(dist)
    return TrainResult(out_dir, state, baseline, model.num_parameters())
