"""Experiment trackers (train.trackers): W&B offline and MLflow's local file store each receive
every metrics.jsonl row, the resolved config and, at the end, the report; `[]` leaves only
metrics.jsonl. Each tracker's data is read back through its own library: MLflow's client, and
W&B's offline transaction log (run-ID.wandb, what `wandb sync` uploads) decoded into W&B's own
protobuf records. The one-line errors for a missing library are rows of test_bad_input.py."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from bigbatch.config.files import config_to_dict, load_config
from bigbatch.engine.metrics import MetricsLog
from bigbatch.engine.trackers import scalars
from bigbatch.run.train import train
from small_runs import TIMINGS, small_config

pytestmark = pytest.mark.usefixtures("single_thread")

RUN = ["--train.max_steps=4", "--train.eval_every=2"]  # eval rows share a step with train rows


def jsonl_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_overrides) -> Path:
    """One short run logging to W&B and MLflow, as a user who configured neither would."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                     "MLFLOW_EXPERIMENT_NAME"):
            env.delenv(name, raising=False)
        env.setenv("NETRC", str(out.parent / "no-netrc"))  # not logged in to W&B either
        train(small_config(tiny_overrides, *RUN, '--train.trackers=["wandb", "mlflow"]'), out,
              verbose=False)
    return out


# --- W&B: the offline run's transaction log, read with W&B's protobuf schema ---------------------

LOG_BLOCK_BYTES, LOG_HEADER_BYTES = 32 * 1024, 7  # LevelDB log layout of .wandb files
FULL, LAST = 1, 4


def wandb_records(path: Path) -> Iterator:
    """The records of a .wandb file: a 7-byte file header (":W&B", magic, version), then LevelDB
    log chunks (crc32c, length, type) in 32 KiB blocks; a record may span chunks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = LOG_HEADER_BYTES, b""
    while pos + LOG_HEADER_BYTES <= len(data):
        left_in_block = LOG_BLOCK_BYTES - pos % LOG_BLOCK_BYTES
        if left_in_block < LOG_HEADER_BYTES:  # a block's tail too short for a chunk is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + LOG_HEADER_BYTES])
        pending += data[pos + LOG_HEADER_BYTES:pos + LOG_HEADER_BYTES + length]
        pos += LOG_HEADER_BYTES + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_offline_run(run_dir: Path) -> dict:
    """History by step, config and artifact file names of the run's one offline W&B run."""
    (log_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return wandb_log(log_file)


def wandb_log(log_file: Path) -> dict:
    """What one offline attempt's transaction log holds: its run id, history, config, files."""
    history: dict[int, dict] = {}
    run_id = ""
    config: dict = {}
    artifact_files: list[str] = []
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            history.setdefault(items.pop("_step"), {}).update(items)
        elif kind == "run":
            run_id = run_id or record.run.run_id
            config.update({item.key: json.loads(item.value_json)
                           for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "artifact":
            artifact_files += [entry.path for entry in record.artifact.manifest.contents]
    return {"history": history, "config": config, "artifact_files": artifact_files,
            "id": run_id}


@pytest.mark.slow  # tracked_run: a training run into W&B and MLflow
def test_wandb_offline_run_holds_every_metric_row(tracked_run):
    """Every scalar of every metrics.jsonl row is in the offline run's history at its step (rows
    of one step, training and evaluation, merge into W&B's one row for that step)."""
    wandb_run = wandb_offline_run(tracked_run)
    rows = jsonl_rows(tracked_run)
    assert {row["step"] for row in rows} == set(wandb_run["history"]) == set(range(5))
    for row in rows:
        logged = wandb_run["history"][row["step"]]
        assert {key: logged.get(key) for key in scalars(row)} == scalars(row), row["step"]
    cfg = config_to_dict(load_config(tracked_run / "config.toml"))
    assert {section: wandb_run["config"][section] for section in cfg} == cfg
    assert wandb_run["artifact_files"] == ["report.html"]  # no plan.json: micro-batch was fixed


# --- MLflow: its client on the run's local file store --------------------------------------------

def mlflow_run(run_dir: Path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("bigbatch")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


@pytest.mark.slow  # tracked_run: a training run into W&B and MLflow
def test_mlflow_file_store_holds_every_metric_row(tracked_run, monkeypatch):
    """Each metric's history is exactly the (step, value) pairs of the rows holding it."""
    client, run = mlflow_run(tracked_run, monkeypatch)
    rows = jsonl_rows(tracked_run)
    keys = {key for row in rows for key in scalars(row)}
    assert set(run.data.metrics) == keys
    for key in keys:
        expected = sorted((row["step"], float(row[key])) for row in rows if key in row)
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == expected, key
    cfg = load_config(tracked_run / "config.toml")
    assert run.data.params["train.max_steps"] == "4"
    assert run.data.params["train.trackers"] == str(list(cfg.train.trackers))
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.toml", "report.html"}
    assert not (tracked_run / "tensorboard").exists()  # not named, so not written


@pytest.mark.slow  # a training run
def test_no_trackers_leaves_metrics_jsonl_only(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    train(small_config(tiny_overrides, "--train.max_steps=2", "--train.trackers=[]"), out,
          verbose=False)
    assert [row["step"] for row in jsonl_rows(out)] == [0, 1, 2, 2]
    assert not any((out / name).exists() for name in ("tensorboard", "wandb", "mlruns"))


# --- A resumed run continues its tracker runs --------------------------------------------------

def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Through TensorBoard's own reader, which applies a purge_step as its UI does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag not in TIMINGS}


@pytest.mark.slow  # three training runs
def test_a_resumed_run_continues_its_tracker_runs_with_each_step_once(tmp_path, tiny_overrides,
                                                                      monkeypatch):
    """A run killed after step 5 with its last checkpoint at step 4, then resumed, leaves what
    an uninterrupted run leaves: one MLflow run whose every metric history equals the straight
    run's; W&B attempts with one run id whose histories together hold each step once, as the
    straight run's; TensorBoard scalars (its reader honours the purge) equal the straight
    run's. Timings aside, the runs are bit-identical on CPU (test_resume.py)."""
    from small_runs import StopAfter

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = small_config(tiny_overrides, "--train.max_steps=6", "--train.eval_every=2",
                       "--checkpoint.every_steps=2",
                       '--train.trackers=["tensorboard", "wandb", "mlflow"]')
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg, straight, verbose=False)
    train(cfg, resumed, verbose=False, preemption=StopAfter(5))
    checkpoints = sorted((resumed / "checkpoints").iterdir())
    assert [c.name for c in checkpoints[-2:]] == ["step-00000004", "step-00000005"]
    import shutil

    shutil.rmtree(checkpoints[-1])  # killed after step 5's rows were sent, before its save
    train(cfg, resumed, verbose=False, resume="auto")

    def without_timings(history: dict[int, dict]) -> dict[int, dict]:
        return {step: {k: v for k, v in row.items() if k not in TIMINGS and not k.startswith("_")}
                for step, row in history.items()}

    attempts = [wandb_log(f) for f in sorted((resumed / "wandb").glob("offline-run-*/run-*.wandb"))]
    assert len(attempts) == 2 and attempts[0]["id"] == attempts[1]["id"]
    assert max(attempts[0]["history"]) == 5 and min(attempts[1]["history"]) == 6
    merged = {**attempts[0]["history"], **attempts[1]["history"]}
    assert without_timings(merged) == without_timings(wandb_offline_run(straight)["history"])

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (client_a, run_a), (client_b, run_b) = (mlflow_run(d, monkeypatch) for d in (straight, resumed))
    assert run_b.info.status == "FINISHED"
    keys = set(run_a.data.metrics) - TIMINGS
    assert keys and keys == set(run_b.data.metrics) - TIMINGS
    for key in keys:
        histories = [sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                                 key))
                     for client, run in ((client_a, run_a), (client_b, run_b))]
        assert histories[0] == histories[1], key

    assert tensorboard_scalars(resumed) == tensorboard_scalars(straight)


# --- The fan-out itself ---------------------------------------------------------------------------

class Recorder:
    where = "memory"

    def __init__(self) -> None:
        self.rows, self.artifacts, self.closed = [], [], []

    def write(self, row):
        self.rows.append(row)

    def log_artifacts(self, paths):
        self.artifacts += [path.name for path in paths]

    def close(self, ok):
        self.closed.append(ok)


@pytest.mark.parametrize("ok", [True, False])
def test_metrics_log_hands_trackers_rows_then_existing_artifacts_once(tmp_path, ok):
    """Rows go to every tracker in order; close passes only the files that exist, only when the
    run went well, and closes each tracker exactly once however often it is called."""
    trackers = [Recorder(), Recorder()]
    log = MetricsLog(tmp_path, trackers=trackers)
    rows = [{"step": 1, "loss": 2.0}, {"step": 1, "val_loss": 3.0}]
    for row in rows:
        log.write(row)
    (tmp_path / "report.html").write_text("<html></html>")
    log.close(artifacts=[tmp_path / "report.html", tmp_path / "plan.json"], ok=ok)
    log.close(ok=False)  # train()'s `finally`: a no-op after the close above
    for tracker in trackers:
        assert tracker.rows == rows
        assert tracker.artifacts == (["report.html"] if ok else [])
        assert tracker.closed == [ok]
    assert jsonl_rows(tmp_path) == rows


def test_trackers_parse_as_a_list_of_known_names():
    assert load_config(None).train.trackers == ("tensorboard",)
    assert load_config(None, ["--train.trackers=wandb"]).train.trackers == ("wandb",)
    assert load_config(None, {"train.trackers": ["mlflow", "wandb"]}).train.trackers == (
        "mlflow", "wandb")
    cfg = load_config(None, ['--train.trackers=["wandb", "mlflow"]'])
    assert config_to_dict(cfg)["train"]["trackers"] == ["wandb", "mlflow"]  # as JSON holds it
