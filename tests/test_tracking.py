"""train.report_to (itune.tracking): TensorBoard, W&B offline and an MLflow file store receive the same scalars,
the run config and the data summary; a resumed run continues the same W&B / MLflow run; a tracker that cannot
start is one line before training; one that fails later is reported once and dropped. The logged values are read
back from the W&B offline run files and the MLflow store (tests/test_resume.py does it for a preempted 2-rank run).
"""

import json
import struct
from pathlib import Path

import pytest

from itune import tracking
from itune.config import RunConfig, validate
from itune.errors import ConfigError

CONFIG = {"train": {"micro_batch_size": 2, "report_to": ["wandb", "mlflow"]}, "model": {"pretrained": None}}
DATA = {"seq_len": 256, "splits": {"train": {"rows": 134}}}


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B ``run-*.wandb`` file: LevelDB log blocks of 32 KiB after a 7-byte ``:W&B`` header
    (records of type FULL, or FIRST / MIDDLE / LAST fragments)."""
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the zero-filled tail of a block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            part = chunk
        elif kind == 3:
            part += chunk
        else:
            out.append(part + chunk)
    return out


def wandb_runs(out_dir: Path) -> list[dict]:
    """Per offline run under ``out_dir/wandb`` (in start order): its id, project, config and history rows
    ``{step: {key: value}}`` (W&B's own ``_step`` / ``_runtime`` / ``_timestamp`` left out)."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for f in sorted(Path(out_dir, "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"id": None, "project": None, "config": {}, "history": {}}
        for raw in _wandb_records(f):
            r = pb.Record()
            r.ParseFromString(raw)
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["project"] = r.run.run_id, r.run.project
                run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update
                                      if not i.key.startswith("_")})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update
                                      if not i.key.startswith("_")})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                step = r.history.step.num if r.history.HasField("step") else row["_step"]
                run["history"][step] = {k: v for k, v in row.items() if not k.startswith("_")}
        runs.append(run)
    return runs


def mlflow_run(out_dir: Path, run_id: str):
    """The MLflow run ``run_id`` in the file store ``out_dir/mlruns``, and a reader of a metric's
    ``[(step, value)]``."""
    import os

    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as itune.tracking sets it for a file store
    client = MlflowClient((Path(out_dir) / "mlruns").resolve().as_uri())
    return client.get_run(run_id), lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)


def test_every_tracker_gets_the_same_values_and_a_resume_continues_the_runs(tmp_path, offline):
    out = tmp_path / "run"
    t = tracking.Trackers(["tensorboard", "wandb", "mlflow"], out, "my-run", CONFIG, DATA)
    t.log(1, {"train/loss": 2.5, "train/lr": 0.001, "train/note": "text", "train/flag": True})
    t.log(2, {"train/loss": 2.25, "train/lr": 0.002})
    t.log(2, {"heldout/loss": 2.75})
    t.close("KILLED")
    ids = json.loads((out / tracking.IDS_FILE).read_text())
    t = tracking.Trackers(["tensorboard", "wandb", "mlflow"], out, "my-run", {**CONFIG, "train": {}}, DATA)
    t.log(3, {"train/loss": 2.0})
    t.close()
    assert json.loads((out / tracking.IDS_FILE).read_text()) == ids  # the same runs, continued

    first, second = wandb_runs(out)
    assert first["id"] == second["id"] == ids["wandb"] and first["project"] == "itune"
    assert first["config"] == {"run": CONFIG, "data": DATA}
    assert first["history"] == {1: {"train/loss": 2.5, "train/lr": 0.001},
                                2: {"train/loss": 2.25, "train/lr": 0.002, "heldout/loss": 2.75}}
    assert second["history"] == {3: {"train/loss": 2.0}}

    run, history = mlflow_run(out, ids["mlflow"])
    assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
    assert history("train/loss") == [(1, 2.5), (2, 2.25), (3, 2.0)] and history("heldout/loss") == [(2, 2.75)]
    assert history("train/flag") == [] and history("train/note") == []  # numbers only
    assert run.data.params == {"run.train.micro_batch_size": "2", "run.train.report_to": '["wandb", "mlflow"]',
                               "run.model.pretrained": "null", "data.seq_len": "256",
                               "data.splits.train.rows": "134"}  # the config of the run's start

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.25), (3, 2.0)]


def test_report_to_checked_with_the_config(monkeypatch):
    cfg = RunConfig()
    cfg.data.path = "x"
    assert cfg.train.report_to == ["tensorboard"] and validate(cfg) == []
    cfg.train.report_to = ["tensorboard", "neptune", "tensorboard"]
    assert validate(cfg) == ["train.report_to: 'neptune' is not one of tensorboard, wandb, mlflow",
                             "train.report_to: ['tensorboard', 'neptune', 'tensorboard'] names a tracker twice"]
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    cfg.train.report_to = ["wandb", "mlflow"]
    assert validate(cfg) == ["train.report_to: wandb needs the wandb package (pip install wandb, or pip install "
                             "'itune[tracking]'), or remove it"]
    cfg.train.report_to = "mlflow"  # one name, as the Hugging Face Trainer takes it; "none": no tracker
    assert validate(cfg) == [] and tracking.report_to_names("none") == []
    cfg.train.report_to = 3
    assert validate(cfg) == ["train.report_to: must be a list of names from tensorboard, wandb, mlflow, got 3"]


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://host/x")
    with pytest.raises(ConfigError) as e:
        tracking.Trackers(["tensorboard", "mlflow"], tmp_path / "run", None, CONFIG, DATA)
    msg = str(e.value)
    assert msg.startswith("train.report_to: mlflow could not start (") and "\n" not in msg
    assert msg.endswith("fix it or remove mlflow from train.report_to")


def test_an_unreachable_tracking_server_fails_at_once(tmp_path, offline, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}/")
    with pytest.raises(ConfigError) as e:
        tracking.Trackers(["mlflow"], tmp_path / "run", None, CONFIG, DATA)
    assert str(e.value) == (f"train.report_to: mlflow could not start (ConnectionError: nothing answers at "
                            f"127.0.0.1:{port} (Connection refused); check MLFLOW_TRACKING_URI); fix it or remove "
                            "mlflow from train.report_to")


def test_a_tracker_failing_later_is_reported_once_and_dropped(tmp_path, offline, capsys):
    out = tmp_path / "run"
    t = tracking.Trackers(["tensorboard", "mlflow"], out, None, CONFIG, DATA)
    client = t.mlflow[0]

    def broken(*a, **k):
        raise OSError("No space left on device")

    real, client.log_batch = client.log_batch, broken
    t.log(1, {"train/loss": 1.0})
    t.log(2, {"train/loss": 0.5})
    client.log_batch = real
    t.close()
    assert capsys.readouterr().out.count("warning: train.report_to: mlflow failed (OSError: No space left on "
                                        "device); it logs nothing more in this run") == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5)]
