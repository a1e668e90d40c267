"""End-to-end runs on real FashionMNIST slices: Parquet rows per round, resume == uninterrupted."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fm_ray.config import DataConfig, ModelConfig, PoolConfig, RunConfig, StrategyConfig, TrainConfig, from_dict
from fm_ray.model.zoo import build_model
from fm_ray.run.recipe import run_experiment
from fm_ray.run.rundir import TIMING_COLUMNS

# Classes 3, 7, 9 become model outputs 0, 1, 2: a bug that mixes up the two numberings shows
# (with classes 0, 1, 2 it would map each class to itself and hide).
CLASSES = (3, 7, 9)
SMALL = DataConfig(dataset="fashion_mnist", setting="custom", class_counts=((3, 60), (7, 300), (9, 60)))


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


def test_two_round_run_writes_rows(tmp_path, fmnist):
    out = run_experiment(small_cfg(), tmp_path / "run")
    rounds = pq.read_table(out / "rounds.parquet").to_pylist()
    queries = pq.read_table(out / "queries.parquet").to_pylist()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["n_labeled"] for r in rounds] == [20, 30, 40]
    assert all(r["classes"] == list(CLASSES) and len(r["per_class_accuracy"]) == 3 for r in rounds)
    assert len(queries) == 20 and sorted({q["round"] for q in queries}) == [1, 2]
    assert len({q["pool_index"] for q in queries}) == 20
    # every queried label is the dataset's own label of that image, in the original numbering
    train_y = fmnist.train_y.numpy()
    assert [q["label"] for q in queries] == [int(train_y[q["dataset_index"]]) for q in queries]
    assert {q["label"] for q in queries} <= set(CLASSES)
    # a round's class counts are those of the queries it made, in the order of `classes`
    for r in rounds[:2]:
        labels = [q["label"] for q in queries if q["round"] == r["round"] + 1]
        assert r["queried_class_counts"] == [labels.count(c) for c in CLASSES] and r["n_queried"] == 10
    assert rounds[2]["n_queried"] == 0 and rounds[2]["queried_class_counts"] is None
    # the last round's metrics equal an evaluation of its saved weights on the test split, by hand
    assert from_dict(json.loads((out / "config.json").read_text())["config"]) == small_cfg()
    model = build_model(ModelConfig("cnn"), 1, 28, len(CLASSES))
    model.load_state_dict(torch.load(out / "checkpoint-r2.pt", weights_only=True))
    test_y = fmnist.test_y.numpy()
    keep = np.isin(test_y, CLASSES)
    x = (fmnist.test_x[torch.from_numpy(keep)].float() / 255 - fmnist.mean[0]) / fmnist.std[0]
    with torch.no_grad():
        predicted = np.array(CLASSES)[model.eval()(x).argmax(1).numpy()]
    truth = test_y[keep]
    per_class = [float((predicted[truth == c] == c).mean()) for c in CLASSES]
    assert rounds[2]["accuracy"] == pytest.approx(float((predicted == truth).mean()), abs=1e-12)
    assert rounds[2]["per_class_accuracy"] == pytest.approx(per_class, abs=1e-12)
    assert rounds[2]["balanced_accuracy"] == pytest.approx(np.mean(per_class), abs=1e-12)


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
