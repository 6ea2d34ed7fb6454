"""Experiment trackers beside ``metrics.jsonl``: TensorBoard, Weights & Biases and MLflow (``train.report_to``).

Rank 0 only. Every tracker receives the same scalars (``train/loss``, ``train/lr``, ``heldout/loss``, ...; the
keys of ``metrics.jsonl`` prefixed with their kind), the resolved run config and the data manifest's summary.

- **TensorBoard**: ``output_dir/tensorboard`` (``torch.utils.tensorboard``).
- **Weights & Biases**: ``wandb.init`` with ``dir=output_dir`` (the run files land in ``output_dir/wandb``),
  project ``$WANDB_PROJECT`` (default ``itune``), mode from ``$WANDB_MODE`` (``offline`` needs no network or
  account; ``wandb sync output_dir/wandb/offline-run-*`` uploads later). Config: ``{"run": <run config>,
  "data": <data summary>}``.
- **MLflow**: tracking URI ``$MLFLOW_TRACKING_URI``, default the local file store ``output_dir/mlruns``;
  experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``itune``). The run config is logged as flat params
  (``train.micro_batch_size``) and both trees as artifacts ``run_config.json`` / ``data_summary.json``. MLflow 3
  refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; itune sets that for a ``file:`` URI it is given or
  chooses (a database URI such as ``sqlite:///mlflow.db`` needs the full ``mlflow`` package).

A resumed run continues the same W&B and MLflow runs: their ids are kept in ``output_dir/trackers.json``.
A tracker that cannot start stops the run before training with one line (:class:`~itune.errors.ConfigError`);
one that fails later is reported once and dropped, never ending the training.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from pathlib import Path

from itune.errors import ConfigError

#: the values of ``train.report_to``
REPORT_TO = ("tensorboard", "wandb", "mlflow")
#: the module each tracker imports, and what to install for it
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow-skinny (or mlflow)")}
IDS_FILE = "trackers.json"


def report_to_names(report_to) -> list:
    """``train.report_to`` as a list: a string is one name (``wandb``), or ``none`` for no tracker, as the
    Hugging Face Trainer's ``report_to`` accepts it."""
    if isinstance(report_to, str):
        return [] if report_to == "none" else [report_to]
    return report_to


def report_to_problems(report_to) -> list[str]:
    """The problems of a ``train.report_to`` value (a list of :data:`REPORT_TO` names, each at most once, or one
    name; ``[]`` or ``none`` logs to ``metrics.jsonl`` only), including a tracker whose package is not installed."""
    report_to = report_to_names(report_to)
    if not isinstance(report_to, list) or not all(isinstance(x, str) for x in report_to):
        return [f"train.report_to: must be a list of names from {', '.join(REPORT_TO)}, got {report_to!r}"]
    out = [f"train.report_to: {x!r} is not one of {', '.join(REPORT_TO)}" for x in report_to if x not in REPORT_TO]
    if len(set(report_to)) != len(report_to):
        out.append(f"train.report_to: {report_to} names a tracker twice")
    for x in dict.fromkeys(report_to):
        if x in _PACKAGES and importlib.util.find_spec(_PACKAGES[x][0]) is None:
            out.append(f"train.report_to: {x} needs the {_PACKAGES[x][1]} package (pip install "
                       f"{_PACKAGES[x][1].split(' ')[0]}, or pip install 'itune[tracking]'), or remove it")
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists stay values)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def data_summary(data_path: str, manifest: dict) -> dict:
    """What a tracker records of the prepared data: its path, seq_len, template, packing, the tokenizer
    fingerprint and per split the scalar counts of the manifest (examples, rows, tokens, trainable_tokens,
    padding_tokens, packing_efficiency, ...)."""
    return {"path": str(data_path), "seq_len": manifest.get("seq_len"), "template": manifest.get("template"),
            "template_fingerprint": manifest.get("template_fingerprint"), "packing": manifest.get("packing"),
            "tokenizer_fingerprint": (manifest.get("tokenizer") or {}).get("fingerprint"),
            "splits": {name: {k: v for k, v in info.items() if isinstance(v, (int, float, str)) and k != "eval_sha256"}
                       for name, info in (manifest.get("splits") or {}).items()}}


def _check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raises ConnectionError at once when nothing answers at the host and port of an ``http(s)://`` tracking URI
    (MLflow's client would retry with back-off for minutes before failing)."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(uri)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {u.hostname}:{port} ({e.strerror or e}); check "
                              "MLFLOW_TRACKING_URI") from None


class Trackers:
    """The trackers of ``report_to`` (built on rank 0 only).

    Args:
        names: ``train.report_to``.
        out_dir: the run's ``output_dir``.
        run_name: shown by W&B and MLflow (default: the name of ``out_dir``).
        config: the resolved run config (:func:`itune.config.to_dict`).
        data: :func:`data_summary`.

    Raises:
        ConfigError: a tracker cannot start (one line naming it and why).
    """

    def __init__(self, names: list, out_dir: Path, run_name: str | None, config: dict, data: dict):
        self.out_dir = Path(out_dir)
        self.names = list(dict.fromkeys(report_to_names(names)))
        self.run_name = run_name or self.out_dir.resolve().name
        self.tb = self.wandb_run = self.mlflow = None
        self.warned: set = set()
        if not self.names:
            return
        ids_path = self.out_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        for name in self.names:
            try:
                getattr(self, f"_start_{name}")(config, data, ids)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of a third-party start is reported as one line
                self.close()
                first = (str(e).strip().splitlines() or [""])[0]
                first = first if len(first) <= 300 else first[:200] + " ... " + first[-90:]
                hint = " (WANDB_MODE=offline logs without network or account)" if name == "wandb" else ""
                raise ConfigError(f"train.report_to: {name} could not start ({type(e).__name__}: {first}){hint}; fix "
                                  f"it or remove {name} from train.report_to") from None
        if ids:
            ids_path.write_text(json.dumps(ids, indent=1) + "\n")

    # --- starting --------------------------------------------------------------------------------------------
    def _start_tensorboard(self, config, data, ids):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def _start_wandb(self, config, data, ids):
        import wandb

        kw = dict(id=ids["wandb"], resume="allow") if ids.get("wandb") else {}
        self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "itune", name=self.run_name,
                                    dir=str(self.out_dir), config={"run": config, "data": data},
                                    settings=wandb.Settings(console="off", x_disable_stats=True), **kw)
        ids["wandb"] = self.wandb_run.id

    def _start_mlflow(self, config, data, ids):
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunStatus

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.out_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local store the user chose or ours
        elif uri.startswith(("http://", "https://")):
            _check_reachable(uri)
        client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "itune"
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run_id = ids.get("mlflow")
        if run_id:  # a resumed run goes on in the same MLflow run; params stay those of its start
            client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            run_id = client.create_run(exp_id, run_name=self.run_name).info.run_id
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v)
                      for k, v in flatten({"run": config, "data": data}).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                client.log_batch(run_id, params=[Param(p.key, p.value[:6000]) for p in params[i:i + 100]])
            client.log_dict(run_id, config, "run_config.json")
            client.log_dict(run_id, data, "data_summary.json")
        ids["mlflow"] = run_id
        self.mlflow = (client, run_id, uri)
        print(f"mlflow: run {run_id} ({self.run_name}) in experiment {name!r} at {uri}", flush=True)

    # --- logging ---------------------------------------------------------------------------------------------
    def _failed(self, name: str, e: Exception) -> None:
        if name not in self.warned:
            self.warned.add(name)
            print(f"warning: train.report_to: {name} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                  "it logs nothing more in this run (metrics.jsonl has every value)", flush=True)

    def log(self, step: int, values: dict) -> None:
        """Logs ``values`` (``{"train/loss": 1.23, ...}``: numbers; others are left out) at optimizer ``step``."""
        values = {k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not values:
            return
        if self.tb is not None and "tensorboard" not in self.warned:
            try:
                for k, v in values.items():
                    self.tb.add_scalar(k, v, step)
            except Exception as e:  # noqa: BLE001
                self._failed("tensorboard", e)
        if self.wandb_run is not None and "wandb" not in self.warned:
            try:
                self.wandb_run.log(values, step=step)
            except Exception as e:  # noqa: BLE001
                self._failed("wandb", e)
        if self.mlflow is not None and "mlflow" not in self.warned:
            from mlflow.entities import Metric

            client, run_id, _ = self.mlflow
            now = int(time.time() * 1000)
            try:
                client.log_batch(run_id, metrics=[Metric(k, v if math.isfinite(v) else float("nan"), now, step)
                                                  for k, v in values.items()])
            except Exception as e:  # noqa: BLE001
                self._failed("mlflow", e)

    def close(self, status: str = "FINISHED") -> None:
        """Flushes and ends every tracker (``status``: ``FINISHED``, or ``KILLED`` for a preempted run that will
        be resumed; W&B marks an unfinished run by its exit code)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish(exit_code=0 if status == "FINISHED" else 1)
            except Exception as e:  # noqa: BLE001
                self._failed("wandb", e)
            self.wandb_run = None
        if self.mlflow is not None:
            client, run_id, _ = self.mlflow
            try:
                client.set_terminated(run_id, status=status)
            except Exception as e:  # noqa: BLE001
                self._failed("mlflow", e)
            self.mlflow = None
