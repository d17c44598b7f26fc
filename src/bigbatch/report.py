"""Run reports: `bigbatch report RUN_DIR` and `bigbatch compare RUN_DIR... --out FILE.html`.

A report is one self-contained HTML file (CSS and PNG plots inlined, no scripts, no fetches) built
from what `bigbatch train` leaves in its run directory: config.toml, metrics.jsonl, run_info.json
and plan.json. It reads the TOML as plain data, not as a `Config`, so a run written by an older
or newer bigbatch still gets its page. Plots: report_plots.py; page layout: report_html.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from bigbatch.errors import UsageError
from bigbatch.run_info import flops_per_token, read_run_info

REPORT_NAME = "report.html"


@dataclass
class RunData:
    """Everything a report shows about one run, read once from its directory."""

    run_dir: Path
    label: str
    config: dict[str, Any]
    config_text: str
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    plan: dict[str, Any] | None
    model_shape: dict[str, Any] | None
    has_model: bool
    notes: list[str] = field(default_factory=list)

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        return self.config.get(section, {}).get(key, default)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(tokens, values) of every row that logged `key` with a finite number."""
        xs, ys = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value):
                xs.append(row.get("tokens", 0))
                ys.append(value)
        return xs, ys

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if "loss" in row]

    @property
    def last_step(self) -> int:
        return max((row["step"] for row in self.train_rows), default=0)

    @property
    def max_steps(self) -> int | None:
        return self.setting("train", "max_steps")

    @property
    def finished(self) -> bool:
        return self.has_model and self.max_steps is not None and self.last_step >= self.max_steps


def _read_rows(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        notes.append("metrics.jsonl is missing: the run stopped before its first step.")
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # a process killed mid-write leaves a cut last line
                notes.append(f"metrics.jsonl line {number} was cut short (the process was "
                             "killed while writing it) and is left out.")
                continue
            raise UsageError(f"{str(path)!r} line {number} is not JSON: the metrics file is "
                             "damaged") from None
    return rows


def load_run(run_dir: Path | str, label: str | None = None) -> RunData:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{str(run_dir)!r} is not a directory: pass the --out directory of a "
                         "`bigbatch train` run")
    config_path, metrics_path = run_dir / "config.toml", run_dir / "metrics.jsonl"
    if not config_path.is_file() and not metrics_path.is_file():
        raise UsageError(f"{str(run_dir)!r} is not a bigbatch run directory: it has neither "
                         "config.toml nor metrics.jsonl (`bigbatch train --out DIR` writes both)")
    notes: list[str] = []
    config_text = config_path.read_text() if config_path.is_file() else ""
    try:
        config = tomllib.loads(config_text)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"{str(config_path)!r} is not valid TOML: {err}") from None
    if not config_text:
        notes.append("config.toml is missing: settings below are unknown.")
    plan = shape = None
    if (run_dir / "plan.json").is_file():
        plan = json.loads((run_dir / "plan.json").read_text())
    if (run_dir / "model.json").is_file():
        shape = json.loads((run_dir / "model.json").read_text())
    return RunData(run_dir=run_dir, label=label or run_dir.resolve().name, config=config,
                   config_text=config_text, rows=_read_rows(metrics_path, notes),
                   info=read_run_info(run_dir), plan=plan, model_shape=shape,
                   has_model=(run_dir / "model.safetensors").is_file(), notes=notes)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or as many parent folders as make the names distinct."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


# ---- the summary: numbers computed from the run, each as display text ----

def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m {rest % 60:02d}s" if hours else \
        f"{rest // 60}m {rest % 60:02d}s"


def _fmt_bytes(count: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.2f} {unit}"
    return f"{count:,.0f} B"


def status(run: RunData) -> tuple[str, str]:
    """(css class, sentence): finished, stopped early (and why, when known), or not started."""
    sessions = run.info.get("sessions") or [{}]
    ended = sessions[-1].get("ended")
    if run.finished:
        return "ok", f"finished: {run.last_step} of {run.max_steps} steps"
    if not run.train_rows:
        return "warn", "no training step logged: the run stopped (or is still starting) " \
                       "before its first step"
    if run.max_steps is not None and run.last_step >= run.max_steps:
        return "warn", (f"all {run.last_step} steps ran, but model.safetensors is missing "
                        "(stopped while saving the model, or moved away)")
    why = {None: "still running, or killed without a checkpoint note",
           "finished": "finished"}.get(ended, f"stopped by {ended}")
    return "warn", (f"stopped early at step {run.last_step} of {run.max_steps or '?'} ({why}); "
                    "`bigbatch train` with the same arguments and --resume auto continues it")


def mean_tokens_per_s(run: RunData) -> float | None:
    """Tokens over seconds of the timed steps, the first step (warm-up) left out when others
    exist: a time-weighted mean, not a mean of per-step rates."""
    timed = [row for row in run.train_rows if row.get("step_seconds")]
    if len(timed) > 1:
        timed = timed[1:]
    seconds = sum(row["step_seconds"] for row in timed)
    if not seconds:
        return None
    # tokens per step: the row's global batch when logged (a ramp), else the config's
    tokens = sum(row.get("global_tokens", row["tokens_per_s"] * row["step_seconds"])
                 for row in timed)
    return tokens / seconds


def num_parameters(run: RunData) -> int | None:
    if "num_parameters" in run.info:
        return run.info["num_parameters"]
    if run.has_model:
        from safetensors import safe_open

        with safe_open(str(run.run_dir / "model.safetensors"), framework="numpy") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return None


def model_flops_per_token(run: RunData) -> int | None:
    if "flops_per_token" in run.info:
        return run.info["flops_per_token"]
    model, data = run.config.get("model", {}), run.config.get("data", {})
    vocab = (run.model_shape or {}).get("vocab_size", data.get("vocab_size"))
    if None in (model.get("n_layer"), model.get("d_model"), vocab, data.get("seq_len")):
        return None
    return flops_per_token(model["n_layer"], model["d_model"], vocab, data["seq_len"])


def throughput_text(run: RunData) -> tuple[str, str]:
    """(mean tokens/s, model FLOP/s and MFU) as text."""
    speed = mean_tokens_per_s(run)
    if speed is None:
        return "—", "—"
    fpt = model_flops_per_token(run)
    if fpt is None:
        return f"{speed:,.0f}", "— (model shape unknown)"
    achieved = speed * fpt
    text = f"{achieved / 1e12:.3g} model TFLOP/s ({fpt / 1e6:.2f} MFLOP/token)"
    peak = run.info.get("matmul_peak_flops")
    if peak:
        world = run.info.get("world_size", 1)
        text += (f"; MFU {100 * achieved / (peak * world):.1f} % of a quick "
                 f"{run.info.get('matmul_peak_dtype', '')} matmul peak of {peak / 1e12:.3g} "
                 f"TFLOP/s{' per rank' if world > 1 else ''} measured at start (a lower bound "
                 "of the peak, so MFU is at most this)")
    else:
        text += "; MFU needs the hardware's matmul peak, which this run did not record"
    return f"{speed:,.0f}", text


def batch_text(run: RunData) -> str:
    tokens = run.setting("batch", "global_tokens")
    seq_len = run.setting("data", "seq_len")
    last = run.train_rows[-1] if run.train_rows else {}
    tokens = last.get("global_tokens", tokens)
    seq_len = last.get("seq_len", seq_len)
    if not tokens or not seq_len:
        return "—"
    text = f"{tokens:,} tokens = {tokens // seq_len} sequences x {seq_len} tokens"
    micro, steps = last.get("micro_batch_size"), last.get("num_micro_steps")
    if micro and steps:
        world = max(1, tokens // (seq_len * micro * steps))
        text += (f" = micro-batch {micro} x {steps} micro-steps x {world} rank"
                 f"{'s' if world > 1 else ''}")
    if len({row.get("global_tokens", tokens) for row in run.train_rows}) > 1:
        text += " (at the last step: the batch was ramped, see the batch schedule plot)"
    return text


def plan_text(run: RunData) -> str:
    if run.plan is None:
        micro = run.setting("batch", "micro_batch_size")
        return f"none: micro-batch {micro} set in the config"
    p = run.plan
    return (f"micro-batch {p.get('micro_batch_size')} x {p.get('num_micro_steps')} micro-steps, "
            f"activation checkpointing {p.get('activation_checkpointing')}, predicted peak "
            f"{_fmt_bytes(p.get('predicted_peak_bytes', 0))} of a "
            f"{_fmt_bytes(p.get('budget_bytes', 0))} budget on {p.get('device')}")


def duration_text(run: RunData) -> str:
    sessions = run.info.get("sessions") or []
    closed = [s["seconds"] for s in sessions if s.get("seconds") is not None]
    steps = sum(row.get("step_seconds", 0.0) for row in run.train_rows)
    if closed:
        text = _fmt_seconds(sum(closed))
        if len(sessions) > 1:
            text += f" over {len(sessions)} sessions (resumed)"
        if len(closed) < len(sessions):
            open_ = len(sessions) - len(closed)
            text += (f" (+ {open_} session{'s' if open_ > 1 else ''} without an end: killed, "
                     "or still running)")
        return f"{text}; {_fmt_seconds(steps)} in optimizer steps"
    return f"{_fmt_seconds(steps)} in optimizer steps (whole-run time not recorded)"


def validation_text(run: RunData) -> tuple[str, str]:
    _, values = run.series("val_loss")
    if not values:
        return "— (no validation rows)", "—"
    evals = [row for row in run.rows if "val_loss" in row]
    best = min(evals, key=lambda row: row["val_loss"])
    return (f"{values[-1]:.4f} nats/token at step {evals[-1]['step']}",
            f"{best['val_loss']:.4f} at step {best['step']}")


def summarize(run: RunData) -> dict[str, str]:
    """The summary table of one run, label -> text, in reading order."""
    model = run.config.get("model", {})
    params = num_parameters(run)
    data_path = run.setting("data", "path", "")
    final_val, best_val = validation_text(run)
    speed, flops = throughput_text(run)
    last = run.train_rows[-1] if run.train_rows else {}
    return {
        "status": status(run)[1],
        "model": (f"GPT, {model.get('n_layer', '?')} layers, d_model {model.get('d_model', '?')}, "
                  f"{model.get('n_head', '?')} heads" if model.get("source", "gpt") == "gpt"
                  else str(model["source"])),
        "parameters": f"{params:,} ({params / 1e6:.2f}M)" if params else "—",
        "data": (f"{data_path or 'the embedded standard-library corpus'}; seq_len "
                 f"{run.setting('data', 'seq_len', '?')}, vocab "
                 f"{(run.model_shape or {}).get('vocab_size', run.setting('data', 'vocab_size', '?'))}"),
        "global batch": batch_text(run),
        "plan": plan_text(run),
        "precision": str(run.setting("precision", "dtype", "—")),
        "hardware": (f"{run.info['hardware']}; torch {run.info.get('torch', '?')}"
                     if "hardware" in run.info else "— (no run_info.json)"),
        "duration": duration_text(run),
        "final validation loss": final_val,
        "best validation loss": best_val,
        "final training loss": f"{last['loss']:.4f}" if last else "—",
        "tokens seen": f"{last.get('tokens', 0):,} in {run.last_step} steps",
        "mean tokens/s": speed,
        "model FLOP/s, MFU": flops,
    }


def check_out(out: Path) -> None:
    if out.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--out {str(out)!r} must name an .html file")
    if not out.parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: the folder {str(out.parent)!r} does not exist")


def write_html(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a page
    return path


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write RUN_DIR/report.html (or `out`) and return its path."""
    from bigbatch.report_html import report_page
    from bigbatch.report_plots import figures

    run = load_run(run_dir)
    out = Path(out) if out else run.run_dir / REPORT_NAME
    check_out(out)
    return write_html(out, report_page(run, summarize(run), status(run), figures([run])))


def write_compare(run_dirs: list[Path | str], out: Path | str) -> Path:
    """Overlay the curves of several runs in one page, with a table of their summaries."""
    from bigbatch.report_html import compare_page
    from bigbatch.report_plots import figures

    if len(run_dirs) < 2:
        raise UsageError(f"compare needs at least two run directories, got {len(run_dirs)}")
    out = Path(out)
    check_out(out)
    dirs = [Path(d) for d in run_dirs]
    runs = [load_run(d, label) for d, label in zip(dirs, run_labels(dirs), strict=True)]
    return write_html(out, compare_page(runs, [summarize(r) for r in runs], figures(runs)))
