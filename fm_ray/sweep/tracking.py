"""Experiment tracking with MLflow (`--mlflow URI` on `run`, `sweep` and `project`).

What is logged: the flattened config as params, the run id as a tag, every round's metrics with
`step = round`, and at the end the report (PNGs, summary.md/.csv) and the result Parquet files as
artifacts. Parquet in the run directory stays the source of truth; MLflow is a view of it, so a
resumed run logs into the same MLflow run (its id is kept in `<run dir>/mlflow.json`).

A local folder or a `file:` URI uses MLflow's file store (no server); MLflow 3 asks for
MLFLOW_ALLOW_FILE_STORE=true to use it, which we set for such URIs only.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from fm_ray._internal.files import write_atomically
from fm_ray.errors import UserError

EXPERIMENT = "fm_ray"  # default MLflow experiment (--mlflow-experiment)
TAG = "fm_ray.run_id"
# Numeric round columns worth plotting over rounds (the rest of a row is config, lists or text).
ROUND_METRICS = (
    "n_labeled",
    "accuracy",
    "balanced_accuracy",
    "n_queried",
    "train_epochs",
    "train_accuracy",
    "train_seconds",
    "eval_seconds",
    "query_seconds",
    "mask_seconds",
    "embed_seconds",
    "select_seconds",
    "mask_size",
    "selection_state_bytes",
    "driver_peak_rss_mb",
    "shard_peak_rss_mb",
    "shard_peak_gpu_mb",
)


def tracking_uri(uri: str) -> str:
    """A plain path becomes an absolute `file:` URI; file stores are allowed explicitly (see module doc)."""
    if "://" not in uri and not uri.startswith(("file:", "databricks", "sqlite:")):
        uri = Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise UserError(
            "--mlflow needs MLflow: pip install 'fm_ray[mlflow]' (or mlflow-skinny), or drop --mlflow"
        ) from None
    return mlflow


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 0.001}} -> {'train.lr': 0.001}; MLflow params are flat strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def round_metrics(row: dict[str, Any], keys: tuple[str, ...] = ROUND_METRICS) -> dict[str, float]:
    """The finite numeric metrics of one round row (None / NaN / missing columns are skipped)."""
    out = {}
    for k in keys:
        v = row.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class RunTracker:
    """One fm_ray run as one MLflow run: `on_round` after every finished round, `finish` at the end.

    The MLflow run is opened at the first round (the run directory exists by then), so bad input that
    stops a run before its first round leaves no empty MLflow run behind.
    """

    def __init__(
        self,
        uri: str,
        rundir: str | Path,
        run_id: str,
        config: dict[str, Any],
        experiment: str = EXPERIMENT,
        fresh: bool = False,
    ):
        self.mlflow = _mlflow()
        self.uri, self.rundir, self.run_id, self.config, self.fresh = uri, Path(rundir), run_id, config, fresh
        self.experiment = experiment
        self.client = self.mlflow.tracking.MlflowClient(tracking_uri(uri))
        self.mlflow_run_id: str | None = None

    def _open(self) -> str:
        if self.mlflow_run_id is not None:
            return self.mlflow_run_id
        state = self.rundir / "mlflow.json"
        known = json.loads(state.read_text()) if state.is_file() and not self.fresh else {}
        if known.get("uri") == self.uri and known.get("run_id") == self.run_id:
            self.mlflow_run_id = str(known["mlflow_run_id"])  # a resumed run goes on in the same MLflow run
            return self.mlflow_run_id
        run = self.client.create_run(
            _experiment_id(self.client, self.experiment), run_name=self.run_id, tags={TAG: self.run_id}
        )
        self.mlflow_run_id = run_id = str(run.info.run_id)
        params = {k: str(v)[:500] for k, v in flatten(self.config).items()}  # MLflow caps param values
        Param = self.mlflow.entities.Param
        for batch in _chunks(sorted(params.items()), 100):
            self.client.log_batch(run_id, params=[Param(k, v) for k, v in batch], synchronous=True)
        self.rundir.mkdir(parents=True, exist_ok=True)
        known = {"uri": self.uri, "run_id": self.run_id, "mlflow_run_id": run_id}
        write_atomically(state, lambda f: f.write(json.dumps(known).encode()))
        return run_id

    def on_round(self, row: dict[str, Any], keys: tuple[str, ...] = ROUND_METRICS) -> None:
        Metric = self.mlflow.entities.Metric
        stamp = int(1000 * time.time())
        metrics = [Metric(k, v, stamp, int(row["round"])) for k, v in round_metrics(row, keys).items()]
        self.client.log_batch(self._open(), metrics=metrics, synchronous=True)

    def finish(self) -> None:
        """The report (PNGs, summary tables) and the result files as artifacts; close the run."""
        from fm_ray.sweep.report import write_report

        run_id = self._open()
        self.client.log_artifacts(run_id, str(write_report(self.rundir)), artifact_path="report")
        for name in ("rounds.parquet", "queries.parquet", "config.json"):
            if (self.rundir / name).is_file():
                self.client.log_artifact(run_id, str(self.rundir / name), artifact_path="results")
        self.client.set_terminated(run_id, "FINISHED")


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return str(exp.experiment_id if exp is not None else client.create_experiment(name))


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def tune_callback(uri: str, experiment: str = EXPERIMENT) -> Any:
    """Ray Tune's own MLflow callback: one MLflow run per trial with its config and per-round metrics."""
    _mlflow()
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=tracking_uri(uri), experiment_name=experiment, save_artifact=False)


def log_sweep_report(uri: str, sweep_dir: str, experiment: str = EXPERIMENT) -> None:
    """The sweep's report (PNGs, summary tables) as artifacts of one MLflow run named after the sweep."""
    from fm_ray.sweep.report import write_report

    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient(tracking_uri(uri))
    name, tags = f"sweep:{Path(sweep_dir).name}", {"fm_ray.sweep": str(sweep_dir)}
    run = client.create_run(_experiment_id(client, experiment), run_name=name, tags=tags)
    client.log_artifacts(run.info.run_id, str(write_report(sweep_dir)), artifact_path="report")
    client.set_terminated(run.info.run_id)


PROJECT_METRICS = ("n_labels", "n_train", "n_holdout", "holdout_accuracy", "train_seconds", "query_seconds", "k")


def log_project_batch(uri: str, project: Any, batch_dir: Path, experiment: str = EXPERIMENT) -> None:
    """A labeling project is one MLflow run; each `next` adds a step (labels, hold-out accuracy,
    seconds) and its batch.csv as an artifact."""
    summary = json.loads((batch_dir / "summary.json").read_text())
    tracker = RunTracker(uri, project.path, f"project:{project.path.name}", project.meta(), experiment)
    tracker.on_round({"round": summary["batch"], "n_labels": len(project.labels()), **summary}, PROJECT_METRICS)
    run_id = tracker._open()
    tracker.client.log_artifact(run_id, str(batch_dir / "batch.csv"), artifact_path=f"batches/{summary['batch']}")
