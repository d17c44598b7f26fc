"""`bigbatch cbs RUN_DIR`: the critical batch measured directly, by branching from checkpoints.

For each checkpoint of a finished run, short branches train at 1x, 2x, 4x, 8x the batch the run
had there (`--factors`; below 1x too), each a resumed run (`train(cfg, dir, resume=checkpoint)`:
the same weights, optimizer moments, data position and random state) into a scratch directory,
with the global batch changed. The learning rate is held at the run's own value at the
checkpoint, scaled to each branch's batch by the run's `optim.lr_scaling` rule, or by the square
root where the run had none (Adam-type updates: Malladi et al. 2022); `--optim.lr_scaling=RULE`
chooses another. The search (tools/cbs_search.py) reads tokens to a common target loss per
branch and takes the largest batch within 20% of the fewest (Zhang et al. 2024); Merrill et al.
(2025, "Critical Batch Size Revisited") branch from checkpoints the same way. The result goes to
RUN_DIR/cbs.json and RUN_DIR/cbs.png beside the run's online noise scale B_simple (gns_tokens in
metrics.jsonl).

Branches restore Adam's second moments from the run's batch: at a larger batch they overstate
the gradient's variance for about 1 / (1 - beta2) steps, which slows the largest branches most.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from bigbatch.config.files import config_from_dict, config_to_dict, parse_overrides
from bigbatch.config.sections import Config
from bigbatch.errors import UsageError
from bigbatch.optim.schedule import scaled_peak_lr, step_learning_rate
from bigbatch.run.checkpoint_files import list_checkpoints, verify_checkpoint
from bigbatch.tasks import task_of
from bigbatch.tools.cbs_search import TARGET_FRACTION, TOLERANCE, search

SCRATCH_MARK = ".bigbatch-cbs"  # a scratch directory cbs made, and may therefore empty
TRAIN_FOR_CBS = "--checkpoint.every_steps=N --checkpoint.keep=100 (N about train.max_steps / 6)"

FLAG_DEFAULTS = {  # `bigbatch cbs`'s flags: (metavar, default)
    "--factors": ("A,B,...", "1,2,4,8 (multiples of the run's batch)"),
    "--branch-tokens": ("N", "32 x the run's batch (the smallest branch's budget)"),
    "--eval-every-tokens": ("N", "2 x the run's batch"),
    "--max-checkpoints": ("N", "4, spread over the run"),
    "--out": ("DIR", "RUN_DIR/cbs-branches (the branches' scratch directory)")}


def _count(text: str | None, flag: str) -> int:
    """A positive integer flag; None (not given) is 0, the default."""
    if text is None:
        return 0
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{flag} = {text!r} must be a positive integer")
    return value


def run_cbs_flags(run_dir: Path, flags: dict[str, str | None], overrides: list[str]) -> dict:
    """`bigbatch cbs`: the command line's flags (strings, None where not given), checked."""
    if not run_dir.is_dir():
        raise UsageError(f"{str(run_dir)!r} is not a run directory: give the --out of a "
                         "bigbatch train run")
    return run_cbs(run_dir, factors=parse_factors(flags["--factors"] or "1,2,4,8"),
                   branch_tokens=_count(flags["--branch-tokens"], "--branch-tokens"),
                   eval_every_tokens=_count(flags["--eval-every-tokens"], "--eval-every-tokens"),
                   max_checkpoints=_count(flags["--max-checkpoints"], "--max-checkpoints") or 4,
                   overrides=overrides, scratch=flags["--out"] and Path(flags["--out"]))


def parse_factors(text: str) -> list[float]:
    """Multiples of the run's batch; below 1 too, for a run whose batch is past its critical
    batch already (e.g. 0.25,0.5,1,2)."""
    try:
        factors = sorted({float(part) for part in text.split(",") if part.strip()})
    except ValueError:
        factors = []
    if len(factors) < 2 or not all(0 < f < math.inf for f in factors):
        raise UsageError(f"--factors {text!r} must list 2 or more positive multiples of the "
                         "run's batch, e.g. --factors 1,2,4,8 or 0.25,0.5,1,2")
    return factors


def factor_batches(start: Start, factors: list[float]) -> list[int]:
    """The branches' global batches: each a whole number of the run's sequences."""
    seq_len = start.config.data.seq_len
    batches = []
    for factor in factors:
        batch = factor * start.batch_tokens
        if batch != round(batch) or round(batch) % seq_len:
            raise UsageError(f"--factors: {factor:g} x the run's batch of {start.batch_tokens:,} "
                             f"tokens is not a whole number of {seq_len}-token sequences")
        batches.append(round(batch))
    return batches


@dataclass
class Start:
    """A checkpoint to branch from, with what the run was doing there."""

    path: Path
    step: int
    tokens: int
    batch_tokens: int       # the run's global batch at its last step before the checkpoint
    lr: float               # the run's learning rate at that step
    config: Config          # the run's resolved config, as the checkpoint holds it


def read_start(path: Path) -> Start:
    meta = json.loads((path / "state.json").read_text())
    cfg = config_from_dict(meta["config"])
    state = meta["train_state"]
    batch = state["batch_tokens"] or cfg.batch.global_tokens
    lr = step_learning_rate(cfg.optim, batch_tokens=batch, tokens_end=state["tokens_seen"],
                            full_batch_tokens=cfg.batch.global_tokens,
                            max_steps=cfg.train.max_steps)
    return Start(path, state["step"], state["tokens_seen"], batch, lr, cfg)


def find_starts(run_dir: Path, max_checkpoints: int) -> list[Start]:
    """The intact checkpoints to branch from: at most `max_checkpoints`, spread evenly over
    the run and always including the last."""
    if not (run_dir / "metrics.jsonl").is_file():
        raise UsageError(f"{str(run_dir)!r} is not a run directory (no metrics.jsonl): give "
                         "the --out of a bigbatch train run")
    found = [p for p in list_checkpoints(run_dir / "checkpoints") if verify_checkpoint(p) is None]
    if len(found) < 2:
        raise UsageError(f"{run_dir / 'checkpoints'} holds {len(found)} intact checkpoint(s); "
                         "cbs branches from 2 or more: train the run with " + TRAIN_FOR_CBS)
    if len(found) > max_checkpoints:
        picks = {round(i * (len(found) - 1) / (max_checkpoints - 1))
                 for i in range(max_checkpoints)}
        found = [found[i] for i in sorted(picks)]
    starts = [read_start(p) for p in found]
    if not task_of(starts[0].config).measures_critical_batch:
        raise UsageError("cbs measures runs whose batch is a number of tokens (train.task = "
                         f"\"lm\"); this run is train.task = {starts[0].config.train.task!r}")
    return starts


def branch_config(start: Start, batch: int, rule: str, target: float | None,
                  budget_tokens: int, eval_every_tokens: int, overrides: list[str]) -> Config:
    """The run's config, resumed at `start` with a fixed global batch of `batch` tokens: a
    constant learning rate (the run's at the checkpoint, scaled by `rule` from its batch there),
    `budget_tokens` more tokens at most, stopped at `target`, no checkpoints, no trackers; then
    the user's `--section.field=VALUE` overrides (e.g. a smaller train.eval_tokens)."""
    doc = config_to_dict(start.config)
    # The run's micro-batch where it divides the branch's sequences: it changes no result.
    micro = math.gcd(start.config.batch.micro_batch_size, batch // start.config.data.seq_len)
    changes = {"batch": {"global_tokens": batch, "micro_batch_size": micro, "ramp": "linear",
                         "ramp_tokens": 0, "ramp_start_tokens": 0},
               "optim": {"lr": start.lr, "lr_scaling": rule,
                         "reference_batch_tokens": start.batch_tokens, "warmup_steps": 0,
                         "decay": "constant"},
               "train": {"max_steps": -(-(start.tokens + budget_tokens) // batch)
                         if budget_tokens else start.tokens // batch,  # 0: train no step
                         "eval_every": max(1, round(eval_every_tokens / batch)),
                         "target_val_loss": target or 0.0, "trackers": []},
               "checkpoint": {"every_steps": 0, "every_minutes": 0.0}}
    for section, values in [*changes.items(), *parse_overrides(overrides).items()]:
        doc.setdefault(section, {}).update(values)
    return config_from_dict(doc)


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a half-written last line from a killed process
    return rows


def noise_at_step(rows: list[dict], step: int) -> float | None:
    """The run's online B_simple (gns_tokens) at its last step up to `step`."""
    values = [r["gns_tokens"] for r in rows if "gns_tokens" in r and r["step"] <= step]
    return values[-1] if values else None


def choose_rule(run_rule: str, overrides: list[str]) -> str:
    """`--optim.lr_scaling=RULE` if given (checked with the branch's config), else the run's
    rule, or sqrt where the run had none: at a fixed lr a larger batch would look wasteful only
    because its steps are too short."""
    asked = parse_overrides(overrides).get("optim", {}).get("lr_scaling")
    return asked if asked is not None else "sqrt" if run_rule == "none" else run_rule


class Brancher:
    """Trains the branches of one checkpoint with the product's own `train()` (resumed from the
    checkpoint) into `scratch/step-N/batch-B/`, and hands the search their evaluation rows."""

    def __init__(self, start: Start, rule: str, eval_every_tokens: int, overrides: list[str],
                 scratch: Path, preemption, run_rows: list[dict]) -> None:
        self.start, self.rule, self.eval_every_tokens = start, rule, eval_every_tokens
        self.overrides, self.preemption = overrides, preemption
        self.directory = scratch / f"step-{start.step}"
        self.start_loss: float | None = None
        branch = branch_config(start, start.batch_tokens, rule, None, 0, eval_every_tokens,
                               overrides)
        if branch.train.eval_tokens == start.config.train.eval_tokens:  # the same windows
            logged = [r["val_loss"] for r in run_rows if r["step"] == start.step
                      and "val_loss" in r]
            self.start_loss = logged[-1] if logged else None

    def _train(self, cfg: Config, name: str):
        from bigbatch.run.train import train

        out = self.directory / name
        shutil.rmtree(out, ignore_errors=True)  # a previous cbs's branch: inside our scratch
        result = train(cfg, out, verbose=False, resume=str(self.start.path), branch=True,
                       preemption=self.preemption, report=False)
        if result.exit_code:
            raise SystemExit(result.exit_code)  # a signal stops the whole measurement
        return out, result

    def evaluate_start(self) -> float:
        """The validation loss at the checkpoint, where the run did not log it on the same
        windows: a branch that trains no step (train() evaluates a resumed, finished run once)."""
        cfg = branch_config(self.start, self.start.batch_tokens, self.rule, None, 0,
                            self.eval_every_tokens, self.overrides)
        _, result = self._train(cfg, "start")
        return result.metrics["val_loss"]

    def __call__(self, batch: int, target: float | None, budget: int) -> tuple[list[dict], float]:
        if self.start_loss is None:
            self.start_loss = self.evaluate_start()
        cfg = branch_config(self.start, batch, self.rule, target, budget, self.eval_every_tokens,
                            self.overrides)
        out, _ = self._train(cfg, f"batch-{batch}")
        step0, tokens0 = self.start.step, self.start.tokens
        rows = [{"step": 0, "tokens": 0, "val_loss": self.start_loss}]
        rows += [{"step": r["step"] - step0, "tokens": r["tokens"] - tokens0,
                  "val_loss": r["val_loss"]} for r in read_rows(out / "metrics.jsonl")
                 if "val_loss" in r and r["step"] > step0]
        return rows, scaled_peak_lr(self.start.lr, self.rule, batch, self.start.batch_tokens)


def prepare_scratch(scratch: Path) -> None:
    if scratch.exists() and any(scratch.iterdir()) and not (scratch / SCRATCH_MARK).exists():
        raise UsageError(f"--out {str(scratch)!r} holds files cbs did not write: choose an empty "
                         "or new directory for the branches")
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / SCRATCH_MARK).write_text("branches of bigbatch cbs; safe to delete\n")


def run_cbs(run_dir: Path, *, factors: list[float], branch_tokens: int = 0,
            eval_every_tokens: int = 0, max_checkpoints: int = 4, overrides: list[str] | None = None, scratch: Path | None = None,
            say=print) -> dict:
    """Measure the critical batch at up to `max_checkpoints` checkpoints of `run_dir`; write
    RUN_DIR/cbs.json and cbs.png; return what cbs.json holds."""
    from bigbatch.run.preemption import Preemption

    if max_checkpoints < 2:
        raise UsageError(f"--max-checkpoints = {max_checkpoints} must be at least 2")
    starts = find_starts(run_dir, max_checkpoints)
    for start in starts:
        factor_batches(start, factors)  # before any branch trains
    rule = choose_rule(starts[0].config.optim.lr_scaling, list(overrides or []))
    branch_config(starts[0], starts[0].batch_tokens, rule, None, 0, 1, list(overrides or []))
    scratch = scratch or run_dir / "cbs-branches"  # made once the overrides are known good
    prepare_scratch(scratch)
    run_rows = read_rows(run_dir / "metrics.jsonl")
    preemption = Preemption()  # one for every branch: a signal stops the whole measurement
    result = {"run_dir": str(run_dir), "factors": factors, "tolerance": TOLERANCE,
              "target_fraction": TARGET_FRACTION, "lr_scaling": rule,
              "optimizer": starts[0].config.optim.name, "points": []}
    for start in starts:
        budget = branch_tokens or 32 * start.batch_tokens
        every = eval_every_tokens or 2 * start.batch_tokens
        result.update(branch_tokens=budget, eval_every_tokens=every)
        say(f"cbs: step {start.step} ({start.tokens:,} tokens, batch {start.batch_tokens:,}, "
            f"lr {start.lr:.3g}): branches of up to {budget:,} tokens, {rule} lr scaling")
        brancher = Brancher(start, rule, every, list(overrides or []), scratch, preemption,
                            run_rows)
        found = search(brancher, factor_batches(start, factors), budget, say=say)
        result["points"].append({"checkpoint": str(start.path), "step": start.step,
                                 "tokens": start.tokens, "batch_tokens": start.batch_tokens,
                                 "lr": start.lr,
                                 "noise_scale_tokens": noise_at_step(run_rows, start.step),
                                 **found.to_dict()})
    last = result["points"][-1]
    result["final"] = {"step": last["step"], "critical_batch_tokens":
                       last["critical_batch_tokens"], "noise_scale_tokens":
                       last["noise_scale_tokens"], "batch_tokens": last["batch_tokens"]}
    (run_dir / "cbs.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_cbs(result, run_rows, run_dir / "cbs.png")
    for line in describe_cbs(result):
        say(line)
    say(f"cbs: {run_dir / 'cbs.json'}, {run_dir / 'cbs.png'}; branches in {scratch}/")
    return result


def describe_cbs(result: dict) -> list[str]:
    """The table: per checkpoint, tokens to the target per factor (x the fewest), the critical
    batch and the online noise scale there."""
    factors = result["factors"]
    head = f"{'step':>6} {'tokens':>11} {'target':>7} " + " ".join(
        f"{f'{f:g}x':>6}" for f in factors) + f" {'critical batch':>16} {'B_simple':>10}"
    lines = [f"tokens to the target, as a multiple of the fewest (> {1 + result['tolerance']:.1f}"
             " = beyond the critical batch; - = not run, past the first beyond):", head]
    for p in result["points"]:
        by_batch = {b["batch_tokens"]: b for b in p["branches"]}
        cells = []
        for f in factors:
            b = by_batch.get(round(f * p["batch_tokens"]))
            cells.append("-" if b is None else "never" if not b["reached"] else
                         f"{b['tokens_to_target'] / p['reference_tokens']:.2f}")
        crit = p["critical_batch_tokens"]
        crit = (f"{'>=' if p['first_beyond_tokens'] is None else ''}{crit:,.0f}")
        noise = p["noise_scale_tokens"]
        lines.append(f"{p['step']:>6} {p['tokens']:>11,} {p['target_loss']:>7.3f} "
                     + " ".join(f"{c:>6}" for c in cells)
                     + f" {crit:>16} {'-' if noise is None else f'{noise:,.0f}':>10}")
    return lines


def plot_cbs(result: dict, run_rows: list[dict], path: Path) -> None:
    """The measured critical batch at each checkpoint (a bar from the largest batch within
    tolerance to the first beyond) over the run's online noise scale and its batch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110, layout="constrained")
    ax = fig.subplots()
    gns = [(r["tokens"], r["gns_tokens"]) for r in run_rows if r.get("gns_tokens")]
    if gns:
        ax.plot(*zip(*gns, strict=True), color="tab:gray", lw=1,
                label="online noise scale B_simple")
    batch = [(r["tokens"], r["global_tokens"]) for r in run_rows if "global_tokens" in r]
    if batch:
        ax.plot(*zip(*batch, strict=True), color="tab:green", lw=1, ls="--", label="run's batch")
    points = result["points"]
    xs = [p["tokens"] for p in points]
    ys = [p["critical_batch_tokens"] for p in points]
    low = [y - p["largest_within_tokens"] for y, p in zip(ys, points, strict=True)]
    high = [(p["first_beyond_tokens"] or y) - y for y, p in zip(ys, points, strict=True)]
    ax.errorbar(xs, ys, yerr=[low, high], fmt="o", color="tab:red", capsize=3,
                label=f"critical batch (branches, {1 + result['tolerance']:.1f}x tokens)")
    ax.set(yscale="log", xlabel="training tokens of the run", ylabel="batch (tokens)",
           title=f"critical batch by branching: {result['optimizer']}, "
                 f"{result['lr_scaling']} lr scaling")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
