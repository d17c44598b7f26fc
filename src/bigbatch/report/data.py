"""A run directory read once for the report: config.toml (as plain TOML data, not a `Config`, so
a run written by an older or newer bigbatch still gets its page), metrics.jsonl, run_info.json,
plan.json and model.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from bigbatch.errors import UsageError
from bigbatch.model.adapters import ADAPTER_FILE
from bigbatch.run.run_info import read_run_info
from bigbatch.tasks import task_named


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
    has_model: bool                 # its final weights: model.safetensors, or LoRA's adapters
    notes: list[str] = field(default_factory=list)

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        return self.config.get(section, {}).get(key, default)

    @property
    def unit(self) -> str:
        """What the rows' `tokens` (and `global_tokens`, `gns_tokens`) count: the unit of the
        run's task (texts for a classifier, tokens for a language model)."""
        return task_named(self.setting("train", "task", "lm")).unit

    @property
    def unit_singular(self) -> str:
        """What a loss is a mean over: "token", or "text" for a classifier."""
        return self.unit.removesuffix("s")

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


def _read_json(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        notes.append(f"{path.name} is not valid JSON and is left out.")
        return None


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
    return RunData(run_dir=run_dir, label=label or run_dir.resolve().name, config=config,
                   config_text=config_text, rows=_read_rows(metrics_path, notes),
                   info=read_run_info(run_dir), plan=_read_json(run_dir / "plan.json", notes),
                   model_shape=_read_json(run_dir / "model.json", notes),
                   has_model=any((run_dir / name).is_file() for name in weights_files(config)),
                   notes=notes)


def weights_files(config: dict[str, Any]) -> tuple[str, ...]:
    """Where a finished run's weights can be: a language model with adapters saves them merged
    (model.safetensors), a classifier with adapters the peft adapter directory."""
    adapted = config.get("model", {}).get("adapter", "none") != "none"
    return ("model.safetensors", ADAPTER_FILE) if adapted else ("model.safetensors",)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Each run's directory name, or as many parent folders as make the names distinct."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]
