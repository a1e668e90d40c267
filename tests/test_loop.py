"""End-to-end runs on real FashionMNIST slices: Parquet rows per round, resume == uninterrupted."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from fm_ray.config import DataConfig, PoolConfig, RunConfig, StrategyConfig, TrainConfig
from fm_ray.run.recipe import run_experiment
from fm_ray.run.rundir import TIMING_COLUMNS

SMALL = DataConfig(dataset="fashion_mnist", setting="custom", class_counts=((0, 60), (1, 300), (2, 60)))


def small_cfg(strategy: str = "entropy", warm_start: bool = False, **kw) -> RunConfig:
    return RunConfig(
        data=SMALL,
        train=TrainConfig(epochs=2, device="cpu", warm_start=warm_start),
        strategy=StrategyConfig(name=strategy),
        pool=PoolConfig(backend="local"),
        init=20,
        batch=10,
        rounds=2,
        seed=1,
        **kw,
    )


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def test_two_round_run_writes_rows(tmp_path):
    out = run_experiment(small_cfg(), tmp_path / "run")
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    queries = pq.read_table(out / "queries.parquet").to_pylist()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["n_labeled"] for r in rounds] == [20, 30, 40]
    assert len(queries) == 20 and sorted({q["round"] for q in queries}) == [1, 2]
    assert len({q["pool_index"] for q in queries}) == 20
    assert all(0 <= r["accuracy"] <= 1 and len(r["per_class_accuracy"]) == 3 for r in rounds)
    assert rounds[0]["queried_class_counts"] is not None and sum(rounds[0]["queried_class_counts"]) == 10
    assert rounds[2]["n_queried"] == 0
    # labels in queries.parquet are the true (original) classes of those pool samples
    assert {q["label"] for q in queries} <= {0, 1, 2}
    assert (out / "config.json").exists()


class Crash(Exception):
    pass


@pytest.mark.parametrize("strategy, warm_start", [("margin", False), ("random", False), ("entropy", True)])
def test_resume_after_crash_equals_uninterrupted(tmp_path, strategy, warm_start):
    cfg = small_cfg(strategy, warm_start)
    full = run_experiment(cfg, tmp_path / "full")

    def crash_after_round_1(row):
        if row["round"] == 1:
            raise Crash

    with pytest.raises(Crash):
        run_experiment(cfg, tmp_path / "cut", on_round=crash_after_round_1)
    assert len(pq.read_table(tmp_path / "cut" / "rounds.parquet")) == 2
    run_experiment(cfg, tmp_path / "cut", resume=True)
    for name in ("rounds.parquet", "queries.parquet"):
        a = pq.read_table(full / name).to_pylist()
        b = pq.read_table(tmp_path / "cut" / name).to_pylist()
        assert strip(a) == strip(b)


def test_budget_caps_last_batch(tmp_path):
    out = run_experiment(small_cfg("least_confidence", budget=35), tmp_path / "b")
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    assert [r["n_labeled"] for r in rounds] == [20, 30, 35]
    assert np.sum(rounds[1]["queried_class_counts"]) == 5


@pytest.mark.parametrize("strategy", ["fishermask", "bait"])
def test_fisher_strategies_complete_on_setting2(tmp_path, strategy):
    from fm_ray.cli import main

    out = tmp_path / strategy
    argv = ["run", "--dataset", "fashion_mnist", "--setting", "setting2", "--model", "cnn", "--strategy", strategy,
            "--init", "20", "--batch", "10", "--rounds", "2", "--epochs", "1", "--fisher-samples", "256",
            "--backend", "local", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    assert [r["n_labeled"] for r in rounds] == [20, 30, 40]
    assert all(r["embed_seconds"] > 0 and r["select_seconds"] > 0 for r in rounds[:2])
    if strategy == "fishermask":  # the paper's mask: 0.2% of the CNN's weights, profile over all tensors
        assert rounds[0]["mask_size"] == sum(p["kept"] for p in rounds[0]["mask_profile"]) > 0
