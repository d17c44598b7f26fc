"""`bigbatch sweep`: steps and tokens to a target loss across global batches, and the critical batch.

Each batch B is trained from the same recipe (its `optim.lr_scaling` rule applied, with the
recipe's own batch as the reference unless `optim.reference_batch_tokens` says otherwise) until
the validation loss reaches the target. Steps to target S(B) are interpolated linearly between the
two evaluations around the crossing; tokens to target are E(B) = B x S(B). McCandlish et al.
(2018) found that such points follow

    (S / S_min - 1) (E / E_min - 1) = 1,   equivalently   S(B) = S_min + E_min / B,

so S_min (the fewest steps, at an infinite batch) and E_min (the fewest tokens, at a tiny batch)
come from a linear least-squares fit of S against 1/B, with each point weighted by 1/S so that
every batch counts by its relative error. B_crit = E_min / S_min: near it, both are within 2x of
their minimum. The online noise scale B_simple (gns_tokens) that each run measured when it crossed
the target is printed beside it: McCandlish et al. predict B_crit ~ B_simple.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bigbatch.config.files import load_config
from bigbatch.config.sections import Config
from bigbatch.errors import UsageError


@dataclass
class SweepPoint:
    batch_tokens: int
    reached: bool
    steps: float | None = None       # optimizer steps to the target (interpolated)
    tokens: float | None = None      # training tokens to the target
    noise_tokens: float | None = None  # the run's gns_tokens at the crossing
    best_val_loss: float | None = None
    run_dir: str = ""


def crossing(rows: list[dict], target: float) -> tuple[float, float] | None:
    """(steps, tokens) at which the validation loss first reaches `target`, interpolated linearly
    between the evaluation before and the one at or below it; None if it never does."""
    evals = [r for r in rows if "val_loss" in r]
    for before, after in zip(evals, evals[1:], strict=False):
        if after["val_loss"] <= target < before["val_loss"]:
            part = (before["val_loss"] - target) / (before["val_loss"] - after["val_loss"])
            return (before["step"] + part * (after["step"] - before["step"]),
                    before["tokens"] + part * (after["tokens"] - before["tokens"]))
    return None


def noise_at(rows: list[dict], steps: float) -> float | None:
    """The last gns_tokens logged at or before `steps` (the estimate at the target loss)."""
    values = [r["gns_tokens"] for r in rows if "gns_tokens" in r and r["step"] <= math.ceil(steps)]
    return values[-1] if values else None


def fit_tradeoff(batches: list[float], steps: list[float]) -> tuple[float, float]:
    """(S_min, E_min) from S(B) = S_min + E_min / B, least squares weighted by 1/S."""
    if len(batches) < 2:
        raise UsageError("the trade-off fit needs at least 2 batches that reached the target")
    b, s = np.asarray(batches, dtype=float), np.asarray(steps, dtype=float)
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
    (s_min, e_min), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    return float(s_min), float(e_min)


def parse_batches(text: str) -> list[int]:
    try:
        batches = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        batches = []
    if len(batches) < 2 or batches[0] < 1:
        raise UsageError(f"--batches {text!r} must list 2 or more positive token counts, "
                         "e.g. --batches 2048,4096,8192")
    return batches


def batch_config(recipe: str | None, overrides: list[str], batch: int, target: float,
                 max_tokens: int, eval_every_tokens: int) -> Config:
    """The recipe at global batch `batch`: lr scaled from the recipe's batch, trained up to
    `max_tokens`, evaluated about every `eval_every_tokens`, stopped at the target. The
    micro-batch is the recipe's, made smaller where the batch would otherwise be a single
    micro-step: the noise scale needs two, and the micro-batch changes no result. The batch is
    fixed at every point (no ramp, whatever the recipe says): the sweep measures fixed batches."""
    base = load_config(recipe, overrides)
    reference = base.optim.reference_batch_tokens or base.batch.global_tokens
    micro = base.batch.micro_batch_size
    if isinstance(micro, int):
        micro = max(1, min(micro, batch // (2 * base.data.seq_len)))
    return load_config(recipe, [
        *overrides, f"--batch.global_tokens={batch}", f"--batch.micro_batch_size={micro}",
        "--batch.ramp=linear", "--batch.ramp_tokens=0",
        f"--optim.reference_batch_tokens={reference}",
        f"--train.max_steps={max(1, -(-max_tokens // batch))}",
        f"--train.eval_every={max(1, round(eval_every_tokens / batch))}",
        f"--train.target_val_loss={target}", "--checkpoint.every_steps=0",
        "--checkpoint.every_minutes=0"])


def run_sweep(recipe: str | None, overrides: list[str], batches: list[int], target: float,
              out_dir: Path, max_tokens: int = 0, eval_every_tokens: int = 0,
              say=print) -> dict:
    """Train every batch, fit the trade-off, write sweep.json and sweep.png; returns the result."""
    from bigbatch.run.preemption import Preemption
    from bigbatch.run.train import train

    preemption = Preemption()
    base = load_config(recipe, overrides)
    max_tokens = max_tokens or base.train.max_steps * base.batch.global_tokens
    eval_every_tokens = eval_every_tokens or 4 * batches[0]
    taken = [b for b in batches if (out_dir / f"batch-{b}").exists()]
    if taken:  # metrics.jsonl is appended to: a second sweep would mix its rows in
        raise UsageError(f"--out {str(out_dir)!r} already holds sweep runs (batch-{taken[0]}): "
                         "choose another --out")
    points = []
    for batch in batches:
        cfg = batch_config(recipe, overrides, batch, target, max_tokens, eval_every_tokens)
        run_dir = out_dir / f"batch-{batch}"
        say(f"sweep: batch {batch:,} tokens: up to {cfg.train.max_steps} steps, evaluating "
            f"every {cfg.train.eval_every}")
        # One Preemption for the whole sweep: SIGTERM/SIGINT stop the sweep, not just one run.
        stopped = train(cfg, run_dir, verbose=False, preemption=preemption).exit_code
        if stopped:
            say(f"sweep: stopped by a signal during batch {batch:,}; {run_dir} holds its "
                "checkpoint")
            raise SystemExit(stopped)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        found = crossing(rows, target)
        point = SweepPoint(batch, found is not None, run_dir=str(run_dir),
                           best_val_loss=min(r["val_loss"] for r in rows if "val_loss" in r))
        if found:
            point.steps, point.tokens = found
            point.noise_tokens = noise_at(rows, point.steps)
        say(f"sweep: batch {batch:,}: " + (f"{point.steps:.1f} steps, {point.tokens:,.0f} tokens"
                                           if found else f"target not reached (best val loss "
                                           f"{point.best_val_loss:.4f})") + " to target")
        points.append(point)
    return summarise(points, target, base, out_dir, say)


def summarise(points: list[SweepPoint], target: float, base: Config, out_dir: Path,
              say=print) -> dict:
    reached = [p for p in points if p.reached]
    result = {"target_loss": target, "optimizer": base.optim.name,
              "lr_scaling": base.optim.lr_scaling, "points": [asdict(p) for p in points]}
    if len(reached) >= 2:
        s_min, e_min = fit_tradeoff([p.batch_tokens for p in reached], [p.steps for p in reached])
        noise = [p.noise_tokens for p in reached if p.noise_tokens is not None]
        result.update(s_min=s_min, e_min=e_min,
                      b_crit=e_min / s_min if s_min > 0 else math.inf,
                      noise_scale_median=statistics.median(noise) if noise else None)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=1))
    if "s_min" in result:
        plot_sweep(result, out_dir / "sweep.png")
    for line in describe_sweep(result):
        say(line)
    if len(reached) < 2:
        raise UsageError(f"only {len(reached)} of {len(points)} batches reached --target-loss "
                         f"{target}: raise the target or --max-tokens (results in "
                         f"{out_dir / 'sweep.json'})")
    return result


def describe_sweep(result: dict) -> list[str]:
    lines = [f"{'batch':>10} {'steps':>9} {'tokens':>13} {'B_simple':>10}"]
    for p in result["points"]:
        if p["reached"]:
            noise = f"{p['noise_tokens']:,.0f}" if p["noise_tokens"] else "-"
            lines.append(f"{p['batch_tokens']:>10,} {p['steps']:>9.1f} {p['tokens']:>13,.0f} "
                         f"{noise:>10}")
        else:
            lines.append(f"{p['batch_tokens']:>10,} {'not reached':>9}")
    if "s_min" in result:
        measured = result["noise_scale_median"]
        lines.append(f"fit: S_min = {result['s_min']:.1f} steps, E_min = {result['e_min']:,.0f} "
                     f"tokens, B_crit = E_min / S_min = {result['b_crit']:,.0f} tokens | "
                     f"measured noise scale at the target: "
                     + (f"{measured:,.0f} tokens (median over runs)" if measured else "none"))
    return lines


def plot_sweep(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    reached = [p for p in result["points"] if p["reached"]]
    s_min, e_min = result["s_min"], result["e_min"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([p["steps"] for p in reached], [p["tokens"] for p in reached], zorder=3)
    for p in reached:
        ax.annotate(f"{p['batch_tokens']:,}", (p["steps"], p["tokens"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    if s_min > 0 and e_min > 0:
        batches = np.geomspace(min(p["batch_tokens"] for p in reached) / 2,
                               max(p["batch_tokens"] for p in reached) * 2, 200)
        steps = s_min + e_min / batches
        ax.plot(steps, steps * batches, color="gray",
                label=f"(S/S_min-1)(E/E_min-1)=1, B_crit={result['b_crit']:,.0f}")
        ax.legend(fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="optimizer steps to target",
           ylabel="training tokens to target",
           title=f"{result['optimizer']} + {result['lr_scaling']} scaling, "
                 f"val loss {result['target_loss']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
