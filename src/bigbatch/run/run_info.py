"""`run_info.json`: the facts about a run that its config and metrics do not hold (hardware,
software, parameters, FLOPs per token, a matmul peak, wall-clock sessions), for the run report.

Written by rank 0 when training starts and again when it ends (or stops early). A resumed run
appends a session, so the report's duration is the time actually spent training.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bigbatch.engine.throughput import describe_hardware, quick_matmul_peak

RUN_INFO = "run_info.json"


def read_run_info(out_dir: Path) -> dict[str, Any]:
    path = out_dir / RUN_INFO
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}  # a file cut short by a kill: the report then shows less, never fails


def _write(out_dir: Path, info: dict[str, Any]) -> None:
    tmp = out_dir / f".{RUN_INFO}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, out_dir / RUN_INFO)


def start_run_info(out_dir: Path, *, began: float, resumed: bool, device: torch.device,
                   world_size: int, dtype_name: str, num_parameters: int, flops: int | None,
                   num_trainable_parameters: int | None = None) -> None:
    """Record the hardware and open a new session that began at `began` (`time.time()`); a run
    resumed from a checkpoint keeps its earlier sessions, a fresh one starts the file anew.
    `flops` per token, where the task counts them, also gets the matmul peak measured (MFU)."""
    info = read_run_info(out_dir) if resumed else {}
    info.update({
        "hardware": describe_hardware(device, world_size),
        "device": str(device),
        "world_size": world_size,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        "num_parameters": num_parameters,
        "num_trainable_parameters": num_trainable_parameters or num_parameters,
    })
    if flops is not None:  # the peak is only wanted for MFU, which needs the model's FLOPs
        info.update({"flops_per_token": flops,
                     "matmul_peak_flops": quick_matmul_peak(device, dtype_name),
                     "matmul_peak_dtype": dtype_name})
    sessions = info.setdefault("sessions", [])
    started = datetime.datetime.fromtimestamp(began, datetime.timezone.utc)
    sessions.append({"started": started.isoformat(timespec="seconds"), "started_unix": began,
                     "seconds": None, "ended": None})
    _write(out_dir, info)


def end_run_info(out_dir: Path, ended: str, **facts: Any) -> None:
    """Close the last session: `ended` is "finished" or the signal that stopped it; `facts`
    known only at the end (the unigram baseline) are recorded beside the others."""
    info = read_run_info(out_dir)
    if not info.get("sessions"):
        return
    info.update(facts)
    session = info["sessions"][-1]
    session["seconds"] = time.time() - session["started_unix"]
    session["ended"] = ended
    _write(out_dir, info)
