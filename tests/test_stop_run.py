"""Stopping criteria in runs: every round's row holds each criterion's value and verdict on the
stop set, `--stop` ends the run at the round its criterion first holds, and `--resume` goes no further."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fm_ray.core import stopping
from fm_ray.errors import UserError
from fm_ray.run.recipe import run_experiment
from fm_ray.run.rundir import TIMING_COLUMNS


def rows(out) -> list[dict]:
    """The rows without timings, NaN as None (so that rows compare equal)."""
    table = pq.read_table(out / "rounds.parquet").to_pylist()
    return [{k: None if v != v else v for k, v in r.items() if k not in TIMING_COLUMNS} for r in table]


def test_rows_hold_every_criterion_recomputed_from_the_stop_set(tmp_path, tiny_cfg):
    out = run_experiment(tiny_cfg(budget=40), tmp_path / "run")
    got = rows(out)
    preds_R_N = np.load(out / "stop_preds.npy")
    assert preds_R_N.shape == (3, 50) and [r["stopped_by"] for r in got] == [None] * 3
    for r, row in enumerate(got):
        for name, (holds, value) in {
            "kappa_average": stopping.kappa_average(preds_R_N[: r + 1], 3),
            "classification_change": stopping.classification_change(preds_R_N[: r + 1]),
            "budget": stopping.budget(row["n_labeled"], 40),
        }.items():
            assert row[f"stop_{name}_holds"] == holds
            assert row[f"stop_{name}"] == (None if value != value else pytest.approx(value))
        assert 0 <= row["stop_overall_uncertainty"] <= 1
    changed = float(np.mean(preds_R_N[2] != preds_R_N[1]))  # literal: the share that changed in round 2
    assert got[2]["stop_classification_change"] == changed
    assert [r["stop_budget_holds"] for r in got] == [False, False, True]


def test_stop_ends_the_run_and_resume_does_not_go_past_it(tmp_path, monkeypatch, tiny_cfg):
    calls: list[int] = []
    real = stopping.overall_uncertainty

    def holds_from_round_1(probs_N_C: torch.Tensor, threshold: float = 0.05) -> tuple[bool, float]:
        calls.append(1)
        _, value = real(probs_N_C, threshold)
        return len(calls) >= 2, value  # the second round (round 1) on

    monkeypatch.setattr(stopping, "overall_uncertainty", holds_from_round_1)
    cfg = tiny_cfg(stop="overall_uncertainty")

    def crash_after_round_0(row: dict) -> None:
        if row["round"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", on_round=crash_after_round_0)
    calls.clear()  # the resumed run's round 1 is its first evaluation: make it the second again
    calls.append(1)
    out = run_experiment(cfg, tmp_path / "run", resume=True)
    got = rows(out)
    assert [r["round"] for r in got] == [0, 1]
    assert [r["stopped_by"] for r in got] == [None, "overall_uncertainty"]
    assert got[1]["n_queried"] == 0 and got[0]["n_queried"] == 10
    assert np.load(out / "stop_preds.npy").shape == (2, 50)
    n_calls = len(calls)
    run_experiment(cfg, tmp_path / "run", resume=True)  # nothing left: no round trains, no row is added
    assert rows(out) == got and len(calls) == n_calls


def test_stop_flags_are_checked(tiny_cfg):
    from fm_ray.run.validate import check

    with pytest.raises(UserError, match="--stop budget needs a --budget"):
        check(tiny_cfg(stop="budget"))
    with pytest.raises(UserError, match="--stop must be one of"):
        check(tiny_cfg(stop="never"))
    with pytest.raises(UserError, match="--stop-set must be positive"):
        check(tiny_cfg(stop_set=0))
