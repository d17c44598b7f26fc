"""The trackers' settings checked before any work (rank 0, before the model is built): an MLflow
store that cannot be written or reached, or a W&B mode that W&B refuses, is one line naming the
setting and what would be valid, not a traceback from the tracker's library after the model
has loaded (or minutes of MLflow's retries against a closed port).

Only what can be known without sending anything: a file store is written to (a probe file), an
http(s) server is connected to (a TCP connect, unless a proxy is configured for it), any other
URI is handed to MLflow's client, which refuses the schemes it has no store for.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from bigbatch.engine.trackers import file_store_path, import_tracker_library, mlflow_tracking_uri
from bigbatch.errors import UsageError

CONNECT_TIMEOUT_S = 5.0
VALID_MLFLOW = ("give a writable directory (file:///DIR or a path), an http(s):// MLflow server, "
                "or unset MLFLOW_TRACKING_URI (the run's own mlruns/)")
# MLflow's SQLAlchemy stores: the full `mlflow` package has them, mlflow-skinny does not.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# wandb.Settings.mode's values (wandb/sdk/wandb_settings.py; a test compares them).
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")


def check_trackers_usable(names: Sequence[str], run_dir: Path) -> None:
    """Raise a UsageError for a tracker whose settings cannot work (rank 0, before the model)."""
    if "mlflow" in names:
        check_mlflow_uri(mlflow_tracking_uri(run_dir), run_dir)
    if "wandb" in names:
        check_wandb_mode(os.environ.get("WANDB_MODE", ""))


def check_mlflow_uri(uri: str, run_dir: Path) -> None:
    setting = f"MLFLOW_TRACKING_URI = {uri!r}"
    parsed, path = urlparse(uri), file_store_path(uri)
    if path is not None:
        if path.resolve() != (run_dir / "mlruns").resolve():  # the run directory is checked
            problem = unwritable(path)
            if problem:
                raise UsageError(f"{setting} is not a writable MLflow store ({problem}): "
                                 f"{VALID_MLFLOW}")
        return
    if parsed.scheme in ("http", "https"):
        check_server(setting, parsed.scheme, parsed.hostname, parsed.port)
        return
    if parsed.scheme.split("+")[0] in DATABASE_SCHEMES and not importlib.util.find_spec("sqlalchemy"):
        raise UsageError(f"{setting} needs MLflow's database store (SQLAlchemy), which "
                         f"mlflow-skinny lacks: pip install mlflow, or {VALID_MLFLOW}")
    import_tracker_library("mlflow")
    from mlflow.tracking import MlflowClient

    try:  # MLflow's own registry of stores decides (databricks, a plugin's scheme, ...)
        MlflowClient(tracking_uri=uri)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(f"{setting} is not a store this MLflow can open ({reason}): "
                         f"{VALID_MLFLOW}") from None


def unwritable(path: Path) -> str:
    """"" if `path` is (or can be made) a directory that takes a file; else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".bigbatch-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        return f"{err.strerror or err}: {err.filename or path}"
    return ""


def check_server(setting: str, scheme: str, host: str | None, port: int | None) -> None:
    if not host:
        raise UsageError(f"{setting} names no host: {VALID_MLFLOW}")
    if scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return  # reached through a proxy: a direct connect would say nothing
    port = port or (443 if scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise UsageError(f"{setting}: no MLflow server answers at {host}:{port} ({reason}): "
                         f"start the server, or {VALID_MLFLOW}") from None


def check_wandb_mode(mode: str) -> None:
    if mode and mode not in WANDB_MODES:
        raise UsageError(f"WANDB_MODE = {mode!r} is invalid: {', '.join(WANDB_MODES)} (or unset "
                         "it: bigbatch then runs W&B offline unless you are logged in)")
