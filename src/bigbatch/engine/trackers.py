"""Experiment trackers: where rank 0 sends each metrics.jsonl row besides that file.

`train.trackers` names them: tensorboard (torch's SummaryWriter), wandb and mlflow, each through
its own library and imported only when named (wandb and mlflow are extras). Each tracker gets the
resolved config when it opens, every row, and at the end the run's files (report.html, plan.json)
as artifacts. Nothing here needs the network: W&B runs offline in RUN_DIR/wandb/ unless the user
configured it, MLflow writes a file store in RUN_DIR/mlruns/ unless MLFLOW_TRACKING_URI says where.

A resumed run continues the tracker runs it opened before (their ids are in RUN_DIR/trackers.json)
rather than opening new ones. The interrupted attempt had sent rows past its last checkpoint,
which the resumed run computes again: TensorBoard purges them (SummaryWriter's purge_step) and
takes the new ones; W&B and MLflow keep the rows they have, and are sent only the steps after
them: W&B refuses a step that goes back, MLflow would keep both values of such a step.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import netrc
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

import tomli_w

from bigbatch.errors import UsageError

MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
# The top-level package each needs: torch.utils.tensorboard is always there, tensorboard may not be.
DISTRIBUTIONS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'bigbatch[wandb]'",
           "mlflow": "pip install 'bigbatch[mlflow]'"}
MLFLOW_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call
IDS_FILE = "trackers.json"     # in the run directory: the tracker runs a resume continues


@dataclass(frozen=True)
class Continuation:
    """A resumed run: its checkpoint's step, and the last step the interrupted attempt logged."""

    step: int
    sent_through: int


def stored_ids(run_dir: Path) -> dict[str, dict[str, str]]:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def store_id(run_dir: Path, name: str, ids: dict[str, str]) -> None:
    """Atomically: a crash while writing leaves the previous ids."""
    path = run_dir / IDS_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**stored_ids(run_dir), name: ids}, indent=1))
    os.replace(tmp, path)


class Tracker(Protocol):
    where: str  # for the start-up line: where this tracker's run is

    def write(self, row: dict[str, Any]) -> None: ...
    def log_artifacts(self, paths: Sequence[Path]) -> None: ...
    def close(self, ok: bool) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers other than the step (which every tracker takes as the x axis)."""
    return {key: value for key, value in row.items() if key != "step"
            and isinstance(value, int | float) and not isinstance(value, bool)}


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"optim": {"lr": 3e-4}} -> {"optim.lr": 3e-4}: one parameter per config key."""
    return {f"{section}.{key}": value for section, values in config.items()
            for key, value in values.items()}


def _not_installed(name: str) -> UsageError:
    return UsageError(f"train.trackers names {name!r}, whose library is not installed: "
                      f"{INSTALL[name]} (or leave {name!r} out of train.trackers)")


def import_tracker_library(name: str) -> ModuleType:
    """The tracker's library, or a UsageError saying what to install."""
    if name == "mlflow":
        # MLflow sends usage telemetry from `import mlflow` on; a training run must need no
        # network, so it is off unless the user asked for it.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        return importlib.import_module(MODULES[name])
    except ImportError:
        raise _not_installed(name) from None


def check_trackers_installed(names: Sequence[str]) -> None:
    """Called on every rank before any collective, so a missing library stops them all alike.
    Found, not imported: only rank 0 pays for the import (and holds the modules' memory)."""
    for name in names:
        if importlib.util.find_spec(DISTRIBUTIONS[name]) is None:  # None too when sys.modules
            raise _not_installed(name)                            # holds None for it


def open_trackers(names: Sequence[str], run_dir: Path, config: dict[str, Any],
                  continued: Continuation | None = None) -> list[Tracker]:
    """Open the named trackers (rank 0 only) and give each the resolved config; a resumed run
    (`continued`) reopens the runs its trackers had."""
    opened: list[Tracker] = []
    try:
        for name in names:
            opened.append(OPENERS[name](run_dir, config, continued))
    except BaseException:
        for tracker in opened:
            tracker.close(ok=False)
        raise
    return opened


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any],
                 continued: Continuation | None = None) -> None:
        SummaryWriter = import_tracker_library("tensorboard").SummaryWriter
        self.where = str(run_dir / "tensorboard")
        # On resume TensorBoard hides the earlier events from the checkpoint's next step on.
        self.writer = SummaryWriter(log_dir=self.where,
                                    purge_step=continued.step + 1 if continued else None)

    def write(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=row["step"])

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        pass  # TensorBoard has no place for files; the run directory holds them

    def close(self, ok: bool) -> None:
        self.writer.close()


def wandb_configured() -> bool:
    """Has the user set W&B up (a mode, an API key, or `wandb login`'s netrc entry)? Read from
    the environment and ~/.netrc only: asking W&B itself could contact its server."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any],
                 continued: Continuation | None = None) -> None:
        offline = not wandb_configured()
        if offline:  # W&B reports its own crashes to its servers unless told not to
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        wandb = import_tracker_library("wandb")
        # Resumed: the same run id. Offline, each attempt is its own directory holding that id,
        # and `wandb sync` sends them all into the one run.
        run_id = stored_ids(run_dir).get("wandb", {}).get("id") if continued else None
        self.sent_through = continued.sent_through if run_id else -1
        self.run = wandb.init(
            project=None if os.environ.get("WANDB_PROJECT") else "bigbatch",
            name=run_dir.resolve().name, dir=str(run_dir), config=config,
            mode="offline" if offline else None, reinit="create_new",
            id=run_id, resume="allow" if run_id else None,
            # bigbatch's own lines stay the output; system metrics would add a sampling process
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        store_id(run_dir, "wandb", {"id": self.run.id})
        self.wandb = wandb
        local = Path(self.run.dir).parent
        self.where = (f"offline in {local} (`wandb sync` that directory to upload)" if offline
                      else f"run {self.run.url or local}")

    def write(self, row: dict[str, Any]) -> None:
        if row["step"] > self.sent_through:
            self.run.log(scalars(row), step=row["step"])

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        if not paths:
            return
        artifact = self.wandb.Artifact(f"run-{self.run.id}", type="bigbatch-run")
        for path in paths:  # immutable: the files are final; no copy into W&B's staging area
            artifact.add_file(str(path), policy="immutable")
        self.run.log_artifact(artifact)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def file_store_path(uri: str) -> Path | None:
    """The directory of an MLflow file store URI (file:///DIR, or a plain path); else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's scheme-less store names
        return None
    return Path(uri) if not parsed.scheme else None


def mlflow_tracking_uri(run_dir: Path) -> str:
    """MLFLOW_TRACKING_URI, or the file store RUN_DIR/mlruns. MLflow 3 refuses every file store
    unless MLFLOW_ALLOW_FILE_STORE is set (it wants a database instead, which mlflow-skinny cannot
    open); a file store named here was asked for, ours or the user's own file:// URI, so it is
    allowed (a MLFLOW_ALLOW_FILE_STORE the user set is kept)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
    if file_store_path(uri) is not None:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any],
                 continued: Continuation | None = None) -> None:
        uri = mlflow_tracking_uri(run_dir)
        import_tracker_library("mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "bigbatch")
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(experiment_name))
        self.run_id, self.sent_through = self.continued_run(run_dir, uri, continued), -1
        if self.run_id:
            self.sent_through = continued.sent_through
            self.client.update_run(self.run_id, status="RUNNING")
        else:  # params once: MLflow refuses a param logged again with another value
            self.run_id = self.client.create_run(experiment_id,
                                                 run_name=run_dir.resolve().name).info.run_id
            params = [Param(key, str(value)) for key, value in flatten(config).items()]
            for start in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id,
                                      params=params[start:start + MLFLOW_PARAMS_PER_BATCH])
        store_id(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": uri})
        self.client.log_text(self.run_id, tomli_w.dumps(config), "config.toml")
        self.where = f"run {self.run_id} in {uri}"

    def continued_run(self, run_dir: Path, uri: str, continued: Continuation | None) -> str:
        """The run id to continue: the stored one, if it is in this tracking store still."""
        from mlflow.exceptions import MlflowException

        stored = stored_ids(run_dir).get("mlflow", {})
        if not continued or stored.get("tracking_uri") != uri:
            return ""
        try:
            return self.client.get_run(stored["run_id"]).info.run_id
        except (MlflowException, KeyError):
            return ""

    def write(self, row: dict[str, Any]) -> None:
        if row["step"] <= self.sent_through:
            return
        now_ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            self.Metric(key, float(value), now_ms, row["step"])
            for key, value in scalars(row).items()])

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


OPENERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
