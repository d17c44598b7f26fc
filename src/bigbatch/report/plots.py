"""The report's plots, drawn by matplotlib (Agg, no display) and inlined as base64 PNG.

Every plot takes a list of runs: one for `bigbatch report`, several for `bigbatch compare`, where
each run keeps one colour and each quantity one line style. A plot whose metric no run logged is
left out, so a report holds exactly one figure per available metric. The x-axis is tokens seen
(runs of different batch sizes line up by data consumed), texts seen for classification runs
(whose schedule counts texts: RunData.unit), except for the compare page's validation loss
against optimizer steps.

matplotlib's object API (`Figure`, no pyplot) keeps no global figure state between reports.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import EngFormatter

from bigbatch.report.data import RunData

FIG_SIZE = (6.4, 3.6)  # inches; at DPI the PNG is 704 x 396 pixels, sharp in a 2-column grid
DPI = 110


@dataclass
class Figure:
    key: str          # the metric: also the HTML id of its section
    title: str
    caption: str
    png_base64: str


def _unit(runs: list[RunData]) -> str:
    """What the runs' `tokens` count ("tokens", "texts"), or both where a comparison mixes them."""
    return " or ".join(sorted({run.unit for run in runs}, reverse=True))


def _per_unit(runs: list[RunData]) -> str:
    """The loss's denominator: nats per token, or per text for classification."""
    return " or ".join(sorted({run.unit_singular for run in runs}, reverse=True))


def _new_figure(runs: list[RunData], rows: int = 1, sharex: bool = True
                ) -> tuple[MplFigure, list[Axes]]:
    fig = MplFigure(figsize=(FIG_SIZE[0], FIG_SIZE[1] * (1 if rows == 1 else 0.75 * rows)),
                    dpi=DPI, layout="constrained")
    axes = list(fig.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0])
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    axes[-1].set_xlabel(f"{_unit(runs)} seen")
    return fig, axes


def _png(fig: MplFigure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _line(ax: Axes, runs: list[RunData], index: int, xs: list[float], ys: list[float],
          name: str, style: dict) -> None:
    """One curve: colour by run when comparing, by quantity (`style`) in a single report."""
    if not xs:
        return
    many = len(runs) > 1
    style = dict(style)
    markers = style.pop("markers", False)  # sparse series (evaluations) show their points
    if many:
        style["color"] = f"C{index}"
    label = f"{runs[index].label}: {name}" if many and name else (runs[index].label if many
                                                                   else name)
    marker = "o" if markers or len(xs) <= 12 else None
    ax.plot(xs, ys, label=label or None, marker=marker, markersize=3, linewidth=1.4, **style)


def _finish(fig: MplFigure, axes: list[Axes], key: str, title: str, caption: str) -> Figure:
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, frameon=False)
    return Figure(key, title, caption, _png(fig))


def _simple(runs: list[RunData], key: str, title: str, ylabel: str, caption: str,
            scale: float = 1.0, from_zero: bool = False) -> Figure | None:
    if not any(run.has(key) for run in runs):
        return None
    fig, (ax,) = _new_figure(runs)
    highest = 0.0
    for i, run in enumerate(runs):
        xs, ys = run.series(key)
        _line(ax, runs, i, xs, [y / scale for y in ys], "", {"color": "C0"})
        highest = max([highest, *(y / scale for y in ys)])
    ax.set_ylabel(ylabel)
    if from_zero:  # a quantity read against its size: a small wobble must not look like a cliff
        ax.set_ylim(0, max(ax.get_ylim()[1], 1.1 * highest))
    return _finish(fig, [ax], key, title, caption)


def plot_loss(runs: list[RunData]) -> Figure | None:
    if not any(run.has("loss") or run.has("val_loss") for run in runs):
        return None
    fig, (ax,) = _new_figure(runs)
    for i, run in enumerate(runs):
        _line(ax, runs, i, *run.series("loss"), "train", {"color": "C0", "alpha": 0.85})
        _line(ax, runs, i, *run.series("val_loss"), "validation",
              {"color": "C1", "linestyle": "--", "markers": True})
    ax.set_ylabel(f"loss (nats/{_per_unit(runs)})")
    caption = (f"Training loss (the exact {_per_unit(runs)} mean over each global batch) and "
               f"validation loss on the fixed held-out set, against {_unit(runs)} seen.")
    if not all(run.has("val_loss") for run in runs):
        missing = [run.label for run in runs if not run.has("val_loss")]
        caption += f" No validation rows were logged for: {', '.join(missing)}."
    return _finish(fig, [ax], "loss", "Loss", caption)


def plot_val_loss_by_step(runs: list[RunData]) -> Figure | None:
    """Compare pages only: validation loss against optimizer steps. Against tokens (the loss
    plot) a smaller batch is often ahead; against steps a larger one is, and where ranks run
    the batch in parallel, steps are what wall time follows."""
    if len(runs) < 2 or not any(run.has("val_loss") for run in runs):
        return None
    fig, (ax,) = _new_figure(runs)
    for i, run in enumerate(runs):
        points = [(row["step"], row["val_loss"]) for row in run.rows
                  if isinstance(row.get("val_loss"), int | float) and "step" in row]
        _line(ax, runs, i, [p[0] for p in points], [p[1] for p in points], "",
              {"color": "C1", "markers": True})
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(f"validation loss (nats/{_per_unit(runs)})")
    return _finish(fig, [ax], "val_loss_steps", "Validation loss against steps",
                   "The validation loss at each evaluation, against optimizer steps taken: "
                   "runs of different batch schedules line up by updates, not by data.")


def plot_val_metrics(runs: list[RunData]) -> Figure | None:
    keys = [("val_accuracy", "accuracy", "-"), ("val_macro_f1", "macro-F1", "--")]
    if not any(run.has(key) for run in runs for key, _, _ in keys):
        return None
    fig, (ax,) = _new_figure(runs)
    for i, run in enumerate(runs):
        for (key, name, dash), colour in zip(keys, ("C2", "C3"), strict=True):
            _line(ax, runs, i, *run.series(key), name, {"color": colour, "linestyle": dash,
                                                         "markers": True})
    ax.set_ylabel("validation score")
    return _finish(fig, [ax], "val_metrics", "Validation accuracy and F1",
                   "Classification scores on the validation set, at each evaluation.")


def plot_grad_norm(runs: list[RunData]) -> Figure | None:
    if not any(run.has("grad_norm") for run in runs):
        return None
    fig, (ax,) = _new_figure(runs)
    derived, by_value = [], []
    for i, run in enumerate(runs):
        xs, before = run.series("grad_norm")
        _line(ax, runs, i, xs, before, "before clipping", {"color": "C0", "alpha": 0.8})
        clip = run.setting("optim", "clip_norm", 0.0) or 0.0
        if (run.setting("optim", "clip_value", 0.0) or 0.0) > 0:
            by_value.append(run.label)
        if run.has("grad_norm_clipped"):
            _line(ax, runs, i, *run.series("grad_norm_clipped"), "after clipping",
                  {"color": "C3", "linestyle": ":"})
        elif clip > 0:
            derived.append(f"{run.label}: clip_norm {clip:g}")
            _line(ax, runs, i, xs, [min(g, clip) for g in before], "after clipping",
                  {"color": "C3", "linestyle": ":"})
    ax.set_ylabel("global gradient L2 norm")
    ax.set_yscale("log")
    caption = "Global gradient norm of each optimizer step, before and after clipping."
    if derived:
        caption += (" The after-clipping norm is not logged, so it is computed as "
                    f"min(norm, optim.clip_norm) ({'; '.join(derived)}).")
    if by_value and not any(run.has("grad_norm_clipped") for run in runs):
        # value clipping runs first (engine/step.py) and can only lower the norm
        caption += (f" {', '.join(by_value)} also clipped element-wise (optim.clip_value), "
                    "which this plot cannot show: the after-clipping norm is at most the one "
                    "drawn.")
    elif not derived and not any(run.has("grad_norm_clipped") for run in runs):
        caption += " Clipping was off (optim.clip_norm = 0)."
    return _finish(fig, [ax], "grad_norm", "Gradient norm", caption)


def plot_fp16(runs: list[RunData]) -> Figure | None:
    skipped_any = any(max(run.series("skipped_steps")[1], default=0) > 0 for run in runs)
    scaled = any(run.has("loss_scale") for run in runs)
    if not scaled and not skipped_any:
        return None
    fig, axes = _new_figure(runs, rows=2 if scaled else 1)  # bf16/fp32 skip steps too, unscaled
    for i, run in enumerate(runs):
        if scaled:
            _line(axes[0], runs, i, *run.series("loss_scale"), "", {"color": "C0"})
        _line(axes[-1], runs, i, *run.series("skipped_steps"), "", {"color": "C3"})
    if scaled:
        axes[0].set_ylabel("loss scale")
        axes[0].set_yscale("log", base=2)
    axes[-1].set_ylabel("skipped steps\n(cumulative)")
    caption = ("The running count of optimizer steps skipped for non-finite gradients.")
    if scaled:
        caption = ("fp16 dynamic loss scale (it halves on an overflow and grows after a run of "
                   "clean steps) and the running count of optimizer steps skipped for "
                   "non-finite gradients.")
    return _finish(fig, axes, "fp16", "Loss scale and skipped steps" if scaled
                   else "Skipped steps", caption)


def plot_noise_scale(runs: list[RunData]) -> Figure | None:
    if not any(run.has("gns_tokens") for run in runs):
        return None
    fig, (time_ax, batch_ax) = _new_figure(runs, rows=2, sharex=False)  # tokens seen; batch size
    for i, run in enumerate(runs):
        rows = [row for row in run.rows if isinstance(row.get("gns_tokens"), int | float)]
        xs = [row.get("tokens", 0) for row in rows]
        noise = [row["gns_tokens"] for row in rows]
        batch = [row.get("global_tokens", run.setting("batch", "global_tokens")) for row in rows]
        _line(time_ax, runs, i, xs, noise, "noise scale", {"color": "C4"})
        _line(time_ax, runs, i, xs, batch, "global batch", {"color": "C7", "linestyle": "--"})
        colour = f"C{i}" if len(runs) > 1 else "C4"
        batch_ax.scatter(batch, noise, s=10, color=colour, alpha=0.7,
                         label=run.label if len(runs) > 1 else None)
    lo, hi = batch_ax.get_xlim()
    batch_ax.plot([lo, hi], [lo, hi], color="0.5", linewidth=0.8, label="noise scale = batch")
    unit = _unit(runs)
    time_ax.set_ylabel(unit)
    batch_ax.set_ylabel(f"noise scale\n({unit})")
    batch_ax.set_xlabel(f"current global batch ({unit})")
    time_ax.set_xlabel(f"{unit} seen")
    return _finish(fig, [time_ax, batch_ax], "gns", "Gradient noise scale",
                   f"Top: the measured gradient noise scale (the critical batch, in {unit}) and "
                   f"the global batch in use, against {unit} seen. Bottom: noise scale against "
                   "the current global batch; points above the grey line mean a larger batch "
                   "would still use its data efficiently.")


def plot_batch_schedule(runs: list[RunData]) -> Figure | None:
    def varies(run: RunData, key: str) -> bool:
        return len(set(run.series(key)[1])) > 1

    if not any(varies(run, "global_tokens") or varies(run, "seq_len") for run in runs):
        return None
    show_len = any(varies(run, "seq_len") for run in runs)
    fig, axes = _new_figure(runs, rows=2 if show_len else 1)
    for i, run in enumerate(runs):
        _line(axes[0], runs, i, *run.series("global_tokens"), "", {"color": "C0"})
        if show_len:
            _line(axes[1], runs, i, *run.series("seq_len"), "", {"color": "C1"})
    axes[0].set_ylabel(f"global batch ({_unit(runs)})")
    axes[0].yaxis.set_major_formatter(EngFormatter(sep=""))
    if show_len:
        axes[1].set_ylabel("sequence length")
    return _finish(fig, axes, "batch_schedule", "Batch schedule",
                   "The global batch (and sequence length) of each optimizer step: a ramped "
                   "batch grows as training goes on.")


def plot_lr(runs: list[RunData]) -> Figure | None:
    return _simple(runs, "lr", "Learning rate", "learning rate",
                   "Learning rate of each optimizer step: warmup, then the configured decay.")


def plot_throughput(runs: list[RunData]) -> Figure | None:
    return _simple(runs, "tokens_per_s", "Throughput", "tokens/s",
                   "Training tokens per second of each optimizer step, all ranks together "
                   "(evaluation and checkpoint time excluded).", from_zero=True)


def plot_memory(runs: list[RunData]) -> Figure | None:
    peak = max((max(run.series("peak_memory_bytes")[1], default=0) for run in runs), default=0)
    unit, scale = ("GiB", 2**30) if peak >= 2**30 else ("MiB", 2**20)
    return _simple(runs, "peak_memory_bytes", "Peak memory", f"peak memory ({unit})",
                   "High-water mark so far, as logged at each step: on CUDA the bytes PyTorch "
                   "allocated on the device, on CPU the process's peak resident set (which also "
                   "holds the data and the interpreter).", scale=scale, from_zero=True)


PLOTS: list[Callable[[list[RunData]], Figure | None]] = [
    plot_loss, plot_val_loss_by_step, plot_val_metrics, plot_lr, plot_grad_norm, plot_fp16, plot_noise_scale,
    plot_throughput, plot_memory, plot_batch_schedule,
]


def figures(runs: list[RunData]) -> list[Figure]:
    """Every plot some run has data for, in reading order."""
    return [fig for plot in PLOTS if (fig := plot(runs)) is not None]
