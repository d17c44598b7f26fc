"""Trackers checked before work: an MLflow store that cannot be opened, written or reached, or a
W&B mode W&B refuses, is one line naming the setting and what would be valid, said before the
model is built; a user's own writable file:// store works; a tracker that fails mid-run is a
warning, once, and metrics.jsonl still gets every row."""

from __future__ import annotations

import json
import socket
import subprocess
import typing
from pathlib import Path

import pytest

from bigbatch.cli import main
from bigbatch.engine.metrics import MetricsLog
from bigbatch.engine.tracker_checks import WANDB_MODES
from small_runs import ROOT, cli_command, small_args

mlflow = pytest.importorskip("mlflow")


@pytest.fixture
def clean_env(monkeypatch):
    """No tracker settings from the machine; whatever bigbatch sets is undone after the test."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME",
                 "WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_error(tmp_path, tiny_overrides, monkeypatch, capsys, tracker: str) -> str:
    """`bigbatch train` with `tracker`; the model must not be built (task_of is asked first)."""
    def no_task(cfg):
        raise AssertionError("the run went on to build the model")

    monkeypatch.setattr("bigbatch.run.train.task_of", no_task)
    code = main(["train", *small_args(tiny_overrides, f'--train.trackers=["{tracker}"]'),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("bigbatch: error:"), err
    return err


def not_a_directory(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("")
    return (tmp_path / "a-file" / "store").as_uri()  # unwritable even for root


@pytest.mark.parametrize(("uri", "fragments"), [
    (lambda tmp: f"sqlite:///{tmp}/mlflow.db", ["needs MLflow's database store", "mlflow-skinny"]),
    (lambda tmp: f"http://127.0.0.1:{closed_port()}", ["no MLflow server answers at 127.0.0.1:"]),
    (not_a_directory, ["is not a writable MLflow store (Not a directory"]),
    (lambda tmp: "nosuchscheme://host/x", ["is not a store this MLflow can open"]),
], ids=["sqlite", "closed-port", "unwritable-file-store", "unknown-scheme"])
def test_an_unusable_mlflow_uri_is_one_line_before_the_model(uri, fragments, tmp_path,
                                                             tiny_overrides, clean_env, capsys):
    value = uri(tmp_path)
    if value.startswith("sqlite") and __import__("importlib").util.find_spec("sqlalchemy"):
        pytest.skip("the full mlflow (with SQLAlchemy) opens sqlite stores")
    clean_env.setenv("MLFLOW_TRACKING_URI", value)
    err = train_error(tmp_path, tiny_overrides, clean_env, capsys, "mlflow")
    assert f"MLFLOW_TRACKING_URI = {value!r}" in err
    assert all(fragment in err for fragment in fragments), err
    assert "http(s)://" in err and "file:///DIR" in err  # what would be valid


def test_an_invalid_wandb_mode_is_one_line_before_the_model(tmp_path, tiny_overrides, clean_env,
                                                            capsys):
    clean_env.setenv("WANDB_MODE", "ofline")
    err = train_error(tmp_path, tiny_overrides, clean_env, capsys, "wandb")
    assert "WANDB_MODE = 'ofline' is invalid: online, offline, disabled" in err


def test_bigbatchs_wandb_modes_are_wandbs():
    wandb_settings = pytest.importorskip("wandb.sdk.wandb_settings")
    annotation = wandb_settings.Settings.model_fields["mode"].annotation
    assert set(WANDB_MODES) == set(typing.get_args(annotation))


def test_a_users_writable_file_store_receives_the_run(tmp_path, clean_env):
    """MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE is set; a file:// URI the
    user gave is a file store asked for, like RUN_DIR/mlruns."""
    from bigbatch.engine.tracker_checks import check_trackers_usable
    from bigbatch.engine.trackers import MlflowTracker

    store = tmp_path / "my store"
    clean_env.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    check_trackers_usable(["mlflow"], run_dir)
    tracker = MlflowTracker(run_dir, {"optim": {"lr": 0.1}})
    tracker.write({"step": 1, "loss": 2.5})
    tracker.close(ok=True)
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    run = client.get_run(tracker.run_id)
    assert run.data.metrics == {"loss": 2.5} and run.data.params == {"optim.lr": "0.1"}
    assert run.info.status == "FINISHED" and not (run_dir / "mlruns").exists()


class GoneServer:
    """A tracker whose server goes away after `good` rows: write raises from then on."""

    def __init__(self, good: int) -> None:
        self.good, self.rows, self.closed = good, [], False

    def write(self, row):
        if len(self.rows) >= self.good:
            raise ConnectionError("server gone\nsecond line")
        self.rows.append(row)

    def log_artifacts(self, paths):
        pass

    def close(self, ok):
        self.closed = True


def test_a_tracker_failing_mid_run_is_one_warning_and_metrics_jsonl_stays_complete(tmp_path,
                                                                                    capsys):
    gone, fine = GoneServer(good=2), GoneServer(good=100)
    log = MetricsLog(tmp_path, trackers=[gone, fine])
    rows = [{"step": step, "loss": 1.0 / step} for step in range(1, 7)]
    for row in rows:
        log.write(row)
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert gone.rows == rows[:2] and fine.rows == rows and fine.closed
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["bigbatch: warning: GoneServer failed at step 3 (ConnectionError: server "
                        "gone); it gets no more rows, metrics.jsonl keeps them all"]


@pytest.mark.slow  # a bigbatch process: torch and mlflow imports, a few seconds
def test_bigbatch_train_with_an_unreachable_mlflow_server_is_one_line_and_exit_2(
        tmp_path, tiny_overrides):
    uri = f"http://127.0.0.1:{closed_port()}"
    env = {**__import__("os").environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(cli_command("train", *small_args(tiny_overrides,
                                                           '--train.trackers=["mlflow"]'),
                                      "--out", str(tmp_path / "out")),
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"MLFLOW_TRACKING_URI = {uri!r}: no MLflow server answers" in done.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
