"""`train()`: one wiring for every task. A task (tasks/: lm, classify) prepares what is
its own (data, loaders, model, loss, evaluation, what to save and say); this module does the rest
the same way for all of them (devices, process group, DDP/FSDP, optimizer, checkpoints, resume,
signals, metrics, the report) and calls `fit()`. No training arithmetic lives here; it is all in
engine/step.py and engine/loop.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bigbatch.config.files import config_to_dict, config_to_toml
from bigbatch.config.sections import Config
from bigbatch.engine.allocator import tune_glibc_malloc
from bigbatch.engine.loop import LoopHooks, StepSetup, TrainState, finished, fit
from bigbatch.engine.metrics import MetricsLog, Progress
from bigbatch.engine.noise_scale import NoiseScaleEMA
from bigbatch.engine.precision import make_precision, slow_autocast_warning, with_resolved_dtype
from bigbatch.engine.tracker_checks import check_trackers_usable
from bigbatch.engine.trackers import Continuation, check_trackers_installed, open_trackers
from bigbatch.errors import UsageError
from bigbatch.model.artifacts import unwrap
from bigbatch.optim.registry import build_optimizer
from bigbatch.parallel.process_group import (
    DistInfo,
    dist_info_from_env,
    init_process_group,
    shutdown,
)
from bigbatch.parallel.wrap import full_model_state_dict, parallelize
from bigbatch.run.checkpoint import Checkpointer
from bigbatch.run.disk_space import FULL_ERRNOS, check_room_to_save, save_final_model
from bigbatch.run.preemption import Preemption, any_rank
from bigbatch.run.resume import agree_on_resume_checkpoint, check_out_dir, drop_metrics_after
from bigbatch.run.run_info import end_run_info, start_run_info
from bigbatch.run.run_lock import RunLock
from bigbatch.tasks import task_of
from bigbatch.tasks.base import TaskContext


@dataclass
class TrainResult:
    """What `train()` returns: where the run is, where it ended, and how."""

    out_dir: Path
    state: TrainState               # step, tokens seen, last validation loss, ...
    num_parameters: int
    exit_code: int = 0              # 128 + signal number when a signal stopped the run early
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's
    unigram_loss: float | None = None  # lm: the loss of a model that learned only frequencies


def resolve_device(name: str, dist: DistInfo) -> torch.device:
    """`train.device` for this rank: "auto"/"cuda" give rank r of a node cuda:LOCAL_RANK.

    An explicit "cuda:N" names one GPU, so it is refused when several ranks run (they would all
    share it); choose a node's GPUs with CUDA_VISIBLE_DEVICES instead.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device = {name!r} but this torch has no CUDA device: use cpu "
                         "or auto")
    if name.startswith("cuda:") and dist.enabled:
        raise UsageError(f"train.device = {name!r} would put all {dist.world_size} ranks on one "
                         "GPU: use cuda or auto (rank r of a node takes cuda:LOCAL_RANK) and "
                         "choose the GPUs with CUDA_VISIBLE_DEVICES")
    if name == "cuda":
        name = f"cuda:{dist.local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise UsageError(f"train.device = {name!r} (local rank {dist.local_rank}) but this node "
                         f"has {torch.cuda.device_count()} GPU(s): start at most that many ranks "
                         "per node, or give cuda:N with N below it")
    return device


def prepare_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {str(out_dir)!r} is not writable: {err.strerror}") from None


def warn(message: str) -> None:
    print(f"bigbatch: warning: {message}", file=sys.stderr, flush=True)


def close_run(out_dir: Path, ended: str, say, report: bool = True, **facts) -> None:
    """Close run_info.json's session and write report.html. The checkpoint or model is already
    on disk, so a failure here costs the run nothing: it is a warning, never an error.

    The report is drawn by a child process (`bigbatch report`): matplotlib and the rendered
    figures (~40 MB) then never raise the training process's peak memory, which the planner's
    `batch.memory_budget` bounds."""
    try:
        end_run_info(out_dir, ended, **facts)
        if not report:
            return
        done = subprocess.run([sys.executable, "-m", "bigbatch", "report", str(out_dir)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
        say(f"report: {done.stdout.strip().splitlines()[-1]}")
    except Exception as err:  # any report bug must not turn a saved run into a failed one
        warn(f"could not write the run report: {type(err).__name__}: {err}")


def final_artifacts(out_dir: Path) -> list[Path]:
    """What the trackers receive at the end, once close_run has written the report (MetricsLog
    skips those a run lacks: plan.json exists only when the planner chose the micro-batch)."""
    return [out_dir / "report.html", out_dir / "plan.json"]


def micro_batch_planner(dist: DistInfo, device: torch.device, out_dir: Path, say):
    """`plan_micro_batch(cfg, vocab_size, data_bytes)` for the tasks: resolve
    `batch.micro_batch_size = "auto"` (and checkpointing, chunked loss, FSDP gradient sync) by
    the memory planner, say the plan, and write it to `plan.json` in the run directory."""
    def plan_micro_batch(cfg: Config, vocab_size: int, data_bytes: int) -> Config:
        from bigbatch.planning.planner import apply_plan, describe_plan, plan_for_config, write_plan

        memory_plan = plan_for_config(cfg, vocab_size, world_size=dist.world_size,
                                      device=str(device), data_bytes=data_bytes)
        for line in describe_plan(memory_plan):
            say(f"plan: {line}")
        if dist.is_main:
            write_plan(memory_plan, out_dir)
        return apply_plan(cfg, memory_plan)

    return plan_micro_batch


def train(cfg: Config, out_dir: Path | str, *, verbose: bool = True,
          resume: str | None = None, overwrite: bool = False,
          preemption: Preemption | None = None, report: bool = True,
          branch: bool = False) -> TrainResult:
    """Train `cfg` into `out_dir` and return the result. `resume` is "auto" or a checkpoint or
    run directory (--resume); `overwrite` replaces a previous run's outputs in `out_dir`
    (otherwise they are refused); `report=False` skips report.html (cbs's short branches);
    `branch=True` lets a resume change the global batch (cbs: a branch counts its own steps).
    SIGTERM/SIGINT stop after the current step with a checkpoint
    (run/preemption.py); the result's exit_code then says which signal. `out_dir` is locked
    for the run's life (run/run_lock.py): a second run into it is refused."""
    lock = RunLock(Path(out_dir))
    try:
        return _train(cfg, Path(out_dir), lock, verbose=verbose, resume=resume,
                      overwrite=overwrite, preemption=preemption, report=report, branch=branch)
    finally:
        lock.release()


def _train(cfg: Config, out_dir: Path, lock: RunLock, *, verbose: bool, resume: str | None,
           overwrite: bool, preemption: Preemption | None, report: bool,
           branch: bool) -> TrainResult:
    dist = dist_info_from_env()
    check_trackers_installed(cfg.train.trackers)  # on every rank, before any collective
    allocator = "system"
    if cfg.train.allocator == "tuned" and tune_glibc_malloc():
        allocator = "tuned (glibc: no per-buffer mmap, no trim)"
    device = resolve_device(cfg.train.device, dist)
    slow_dtype = slow_autocast_warning(cfg.precision.dtype, device)
    cfg, dtype_chosen = with_resolved_dtype(cfg, device)  # config.toml keeps the choice
    init_process_group(dist, device)
    if dist.is_main:
        prepare_out_dir(out_dir)
        lock.acquire()  # before looking at what the directory holds
        check_out_dir(out_dir, resume, overwrite)
        check_trackers_usable(cfg.train.trackers, out_dir)  # before the model: opened after it
    resume_from = agree_on_resume_checkpoint(resume, out_dir, dist, warn, cfg.train.max_steps)
    say = print if verbose and dist.is_main else (lambda *a, **k: None)

    started, began = time.perf_counter(), time.time()
    precision = make_precision(cfg.precision, device)
    task = task_of(cfg)
    run = task.prepare(cfg, TaskContext(dist, device, precision, out_dir, say,
                                        micro_batch_planner(dist, device, out_dir, say)))
    cfg, model = run.cfg, run.model
    for line in run.start_lines:
        say(line)
    if slow_dtype:
        warn(slow_dtype)
    chosen = f" ({dtype_chosen})" if dtype_chosen else ""
    say(f"precision: {cfg.precision.dtype}{chosen} | device: {device} | threads: "
        f"{torch.get_num_threads()} | allocator: {allocator}")
    if dist.is_main:  # before training: the final model and one checkpoint must fit
        check_room_to_save(out_dir, model, cfg.optim.name, cfg.checkpoint.keep, warn)
    wrapped = parallelize(model, cfg.parallel.strategy, device, dist,
                          precision=cfg.precision.dtype,
                          fsdp_gradient_sync=cfg.parallel.fsdp_gradient_sync)
    optimizer = build_optimizer(model, cfg.optim, device)
    if dist.is_main:
        (out_dir / "config.toml").write_text(config_to_toml(cfg))
        start_run_info(out_dir, began=began, resumed=resume_from is not None, device=device,
                       world_size=dist.world_size, dtype_name=cfg.precision.dtype,
                       num_parameters=run.num_parameters, flops=run.flops_per_token,
                       num_trainable_parameters=run.num_trainable_parameters)
    checkpointer = Checkpointer(out_dir, cfg, model=wrapped, optimizer=optimizer,
                                scaler=precision.scaler, loader=run.loader, dist=dist,
                                device=device,
                                full_batch_tokens=run.schedule.full_batch.global_tokens, say=say)
    checkpointer.remove_partial_saves()
    state = TrainState(noise=NoiseScaleEMA(cfg.batch.noise_scale_ema))
    if resume_from is not None:
        checkpointer.restore(resume_from, state, branch)
        say(f"resumed from {resume_from} at step {state.step}")
    elif resume:
        say(f"no checkpoint in {out_dir / 'checkpoints'}: starting at step 0")
    continued = None
    if resume and dist.is_main:  # rows past the checkpoint are about to be logged again
        sent_through = drop_metrics_after(out_dir / "metrics.jsonl",
                                          state.step if resume_from else -1)
        if resume_from is not None:
            continued = Continuation(step=state.step, sent_through=sent_through)
    trackers = []
    if dist.is_main:
        trackers = open_trackers(cfg.train.trackers, out_dir, config_to_dict(cfg), continued)
        if trackers:
            say("trackers: " + " | ".join(f"{name}: {tracker.where}" for name, tracker
                                          in zip(cfg.train.trackers, trackers, strict=True)))
    log = MetricsLog(out_dir, enabled=dist.is_main, trackers=trackers)
    progress = Progress(run.schedule.num_steps(), state.step, cfg.train.log_every,
                        enabled=verbose and dist.is_main)
    preemption = preemption or Preemption()
    metrics: dict[str, float] = {}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        metrics.update(run.evaluate(model))
        return dict(metrics)

    setup = StepSetup(precision, dist, device, run.loss_sum_fn, run.measure_noise)
    hooks = LoopHooks(evaluate, log, progress, on_step_end=checkpointer.maybe_save,
                      should_stop=lambda: any_rank(preemption.requested, dist, device))
    exit_code = 0
    try:
        with preemption.handling_signals():  # also covers the checkpoint written on a signal
            state = fit(wrapped, optimizer, run.loader, state, cfg=cfg, schedule=run.schedule,
                        setup=setup, hooks=hooks)
            # Reaching train.target_val_loss ends the loop early too: that run is finished.
            stopped = not finished(state, run.schedule)  # a signal stopped the loop early
            if stopped:
                path = checkpointer.save_unless_saved(state)
                exit_code = preemption.exit_code
        progress.close()
        if stopped:
            say(f"stopped by {preemption.signal_name} after step {state.step}/"
                f"{run.schedule.num_steps()}: checkpoint {path}")
            say(f"to continue, run the same command with --resume auto --out {out_dir}")
        else:
            if not metrics:  # resumed from a finished run's checkpoint: fit() evaluated nothing
                evaluate(wrapped)
            # Under FSDP gathering the full weights is a collective: all ranks take part.
            weights = full_model_state_dict(wrapped)
            if dist.is_main:
                save_final_model(run.save, unwrap(wrapped), weights, out_dir)
                say(f"done in {time.perf_counter() - started:.0f}s: {state.step} steps, "
                    f"{state.tokens_seen:,} {task.unit}, {state.skipped_steps} skipped steps")
                for line in run.end_lines(state):
                    say(line)
        facts = run.closing_facts()
        if dist.is_main:
            close_run(out_dir, preemption.signal_name if stopped else "finished", say, report,
                      **facts)
        log.close(artifacts=final_artifacts(out_dir))
    except OSError as err:  # a full disk under metrics.jsonl, a tracker's file, ...
        if err.errno not in FULL_ERRNOS:
            raise
        raise UsageError(f"could not write {err.filename or 'to ' + str(out_dir)}: No space "
                         f"left on device; {checkpointer.last_checkpoint_note(state.step)}"
                         ) from None
    except UsageError as err:
        raise UsageError(f"{err}; {checkpointer.last_checkpoint_note(state.step)}") from None
    finally:
        progress.close()
        log.close(ok=False)  # only where an error skipped the close above: the trackers' run failed
    shutdown(dist)
    return TrainResult(out_dir, state, run.num_parameters, exit_code, dict(metrics),
                       facts.get("unigram_val_loss"))
