"""Stopping criteria (fm_ray.core.stopping) against literal re-computations; kappa against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

from fm_ray.core.stopping import budget, classification_change, kappa_average, overall_uncertainty


def _sk_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """scikit-learn's kappa, with perfect agreement counted as 1.0 (sklearn gives NaN when both
    labelings hold one class only)."""
    return 1.0 if np.array_equal(a, b) else float(cohen_kappa_score(a, b))


def _history(rounds: int, n: int, classes: int, flip: float, seed: int) -> np.ndarray:
    """Predictions over `rounds` rounds, each round a share `flip` of the samples re-drawn."""
    rng = np.random.default_rng(seed)
    preds = [rng.integers(0, classes, n)]
    for _ in range(rounds - 1):
        nxt = preds[-1].copy()
        redo = rng.random(n) < flip
        nxt[redo] = rng.integers(0, classes, int(redo.sum()))
        preds.append(nxt)
    return np.stack(preds)


@pytest.mark.parametrize("seed", range(4))
def test_kappa_average_is_the_window_mean_of_sklearn_kappas(seed: int) -> None:
    preds = _history(6, 200, 4, flip=0.05 * (seed + 1), seed=seed)
    for window in (1, 2, 3):
        stop, value = kappa_average(preds, 4, window=window, kappa=0.9)
        pairs = [_sk_kappa(preds[r - 1], preds[r]) for r in range(len(preds) - window, len(preds))]
        expected = sum(pairs) / window
        assert value == pytest.approx(expected, abs=1e-12)
        assert stop == (expected >= 0.9)


def test_kappa_average_counts_identical_predictions_as_one() -> None:
    same = np.zeros((4, 50), dtype=np.int64)  # one class everywhere: sklearn's kappa is 0/0 here
    assert kappa_average(same, 3) == (True, 1.0)
    mixed = np.tile(np.arange(50) % 3, (4, 1))
    assert kappa_average(mixed, 3) == (True, 1.0)


def test_kappa_average_needs_window_pairs() -> None:
    preds = np.tile(np.arange(30) % 3, (3, 1))  # 2 pairs, window 3
    stop, value = kappa_average(preds, 3, window=3)
    assert not stop and value == 1.0
    stop, value = kappa_average(preds[:1], 3)
    assert not stop and math.isnan(value)


def test_overall_uncertainty_is_the_mean_normalized_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(40, 5, generator=g, dtype=torch.float64), 1)
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)  # 0 log 0 = 0
    total = 0.0
    for row in probs.tolist():
        total += -sum(p * math.log(p) for p in row if p > 0) / math.log(5)
    expected = total / len(probs)
    stop, value = overall_uncertainty(probs, threshold=expected)
    assert value == pytest.approx(expected, rel=1e-12) and stop
    assert not overall_uncertainty(probs, threshold=expected * 0.99)[0]
    certain = torch.eye(5, dtype=torch.float64)[torch.arange(40) % 5]
    assert overall_uncertainty(certain) == (True, 0.0)


def test_classification_change_is_the_share_changed_in_the_last_round() -> None:
    preds = _history(3, 100, 4, flip=0.3, seed=7)
    changed = sum(1 for a, b in zip(preds[1], preds[2], strict=True) if a != b)
    stop, value = classification_change(preds)
    assert value == changed / 100 and stop == (changed == 0)
    assert classification_change(preds, threshold=changed / 100)[0]
    assert classification_change(np.stack([preds[2], preds[2]])) == (True, 0.0)
    stop, value = classification_change(preds[:1])
    assert not stop and math.isnan(value)


def test_budget() -> None:
    assert budget(99, 100) == (False, 99.0)
    assert budget(100, 100) == (True, 100.0)
    assert budget(10_000, None) == (False, 10_000.0)
