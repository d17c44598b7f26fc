"""Runs for the report tests: synthetic metrics rows with every key a run can log, a run
directory built from them, and the plots read back out of a page."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def figures_in(page: str) -> dict[str, np.ndarray]:
    """Each plot's id -> its decoded image (RGB array)."""
    found = re.findall(r'<figure id="plot-([a-z_0-9]+)"[^>]*>.*?<img [^>]*src="data:image/png;'
                       r'base64,([A-Za-z0-9+/=]+)"', page, re.S)
    return {key: np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            for key, data in found}


def synthetic_rows(clip_logged: bool) -> list[dict]:
    """Every key a run can log, with a ramped batch and fp16 skipped steps."""
    rows, tokens = [{"step": 0, "tokens": 0, "val_loss": 7.0, "val_accuracy": 0.5,
                     "val_macro_f1": 0.4}], 0
    for step in range(1, 21):
        batch = 1024 if step <= 10 else 2048
        tokens += batch
        row = {"step": step, "tokens": tokens, "loss": 7 - step / 10, "lr": 1e-3 * step / 20,
               "grad_norm": 2.0 / step ** 0.5, "tokens_per_s": batch / 1.0,
               "micro_batch_size": 4, "num_micro_steps": batch // 256, "step_seconds": 1.0,
               "skipped_steps": step // 7, "loss_scale": 2.0 ** (16 - step // 7),
               "peak_memory_bytes": 2**30 + step, "global_tokens": batch,
               "seq_len": 64 if step <= 10 else 128, "gns_tokens": 500.0 * step,
               "gns_grad_sq": 1.0, "gns_trace": 2.0}
        if clip_logged:
            row["grad_norm_clipped"] = min(row["grad_norm"], 1.0)
        rows.append(row)
        if step % 10 == 0:
            rows.append({"step": step, "tokens": tokens, "val_loss": 7 - step / 9,
                         "val_accuracy": 0.5 + step / 50, "val_macro_f1": 0.4 + step / 50})
    return rows


def make_run(tmp_path: Path, source: Path | None, rows: list[dict], name: str = "run",
             config_text: str = "") -> Path:
    """A run directory holding `rows` as its metrics, and the config (and run_info.json and
    model.json) of the run at `source`, or `config_text`. No model file: not a finished run."""
    run_dir = tmp_path / name
    run_dir.mkdir()
    if source is not None:
        for file in ("config.toml", "run_info.json", "model.json"):
            shutil.copy(source / file, run_dir / file)
    else:
        (run_dir / "config.toml").write_text(config_text)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir
