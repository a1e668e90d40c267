"""`--mlflow`: a run's and a sweep's config, per-round metrics and report land in an MLflow file store
and equal what the Parquet results say."""

import os

import pyarrow.parquet as pq
import pytest

from fm_ray.cli import main
from fm_ray.sweep.tracking import RunTracker, flatten, round_metrics

mlflow = pytest.importorskip("mlflow")

SMALL = ["--class-counts", "0:60,1:300,2:60", "--init", "20", "--batch", "10", "--rounds", "2", "--epochs", "1"]
SMALL += ["--model", "cnn", "--device", "cpu", "--backend", "local", "--seed", "3"]


def client(store):
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return mlflow.tracking.MlflowClient(store.resolve().as_uri())


def only_run(c, experiment="fm_ray"):
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_flatten_and_round_metrics():
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": None}) == {"a.b": 1, "a.c.d": "x", "e": None}
    row = {
        "round": 2,
        "accuracy": 0.5,
        "mask_seconds": None,
        "train_epochs": 3,
        "classes": [0, 1],
        "embed_seconds": float("nan"),
    }
    assert round_metrics(row) == {"accuracy": 0.5, "train_epochs": 3.0}


def test_run_logs_config_metrics_and_report(tmp_path):
    store, out = tmp_path / "mlruns", tmp_path / "run"
    argv = ["run", *SMALL, "--strategy", "entropy", "--out", str(out), "--mlflow", str(store)]
    assert main([*argv, "--mlflow-experiment", "tiny"]) == 0
    c = client(store)
    run = only_run(c, "tiny")
    rows = pq.read_table(out / "rounds.parquet").to_pylist()
    assert run.data.params["strategy.name"] == "entropy" and run.data.params["seed"] == "3"
    assert run.data.tags["fm_ray.run_id"] == rows[0]["run_id"]
    history = c.get_metric_history(run.info.run_id, "accuracy")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (r["round"], r["accuracy"]) for r in rows
    ]
    report = {f.path for f in c.list_artifacts(run.info.run_id, "report")}
    assert {"report/learning_curves.png", "report/summary.md", "report/summary.csv"} <= report
    results = {f.path for f in c.list_artifacts(run.info.run_id, "results")}
    assert "results/rounds.parquet" in results
    assert run.info.status == "FINISHED"


def test_a_resumed_run_logs_into_the_same_mlflow_run(tmp_path):
    store, rundir = tmp_path / "mlruns", tmp_path / "run"
    first = RunTracker(str(store), rundir, "rid", {"seed": 1})
    first.on_round({"round": 0, "accuracy": 0.25})
    again = RunTracker(str(store), rundir, "rid", {"seed": 1})  # e.g. after a crash and --resume
    again.on_round({"round": 1, "accuracy": 0.5})
    assert again.mlflow_run_id == first.mlflow_run_id
    history = client(store).get_metric_history(first.mlflow_run_id, "accuracy")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.25), (1, 0.5)]
    fresh = RunTracker(str(store), rundir, "rid", {"seed": 1}, fresh=True)  # --overwrite starts a new one
    fresh.on_round({"round": 0, "accuracy": 0.75})
    assert fresh.mlflow_run_id != first.mlflow_run_id


def test_missing_mlflow_is_one_line(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *a, **k):
        if name == "mlflow":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    argv = ["run", *SMALL, "--strategy", "random", "--out", str(tmp_path / "r"), "--mlflow", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fm_ray[mlflow]" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_logs_each_trial_and_the_report(tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        store, out = tmp_path / "mlruns", tmp_path / "sweep"
        grid = ["--strategies", "random,entropy", "--seeds", "0", *SMALL[:-2], "--rounds", "1"]
        assert main(["sweep", "--out", str(out), *grid, "--mlflow", str(store)]) == 0
    finally:
        ray.shutdown()
    c = client(store)
    runs = c.search_runs([c.get_experiment_by_name("fm_ray").experiment_id])
    sweep_runs = [r for r in runs if r.data.tags.get("fm_ray.sweep")]
    trial_runs = [r for r in runs if not r.data.tags.get("fm_ray.sweep")]
    assert len(sweep_runs) == 1 and len(trial_runs) == 2
    strategies = sorted(r.data.params["cfg/strategy/name"] for r in trial_runs)
    assert strategies == ["entropy", "random"]
    for r in trial_runs:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "accuracy")]
    arts = {f.path for f in c.list_artifacts(sweep_runs[0].info.run_id, "report")}
    assert "report/learning_curves.png" in arts
