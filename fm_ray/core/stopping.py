"""Stopping criteria: when labeling more is unlikely to change the model (small-text's, and a budget).

Each is a pure function of the stop set's history (a fixed, seeded sample of the unlabeled pool,
predicted after every round) returning ``(stop, value)``: the verdict after the last round and the
statistic it is judged on. `preds_R_N` holds the stop set's predicted classes after rounds 0..R-1,
oldest first.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CRITERIA = ("kappa_average", "overall_uncertainty", "classification_change", "budget")


def stop_set(pool_size: int, n: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """The stop set: `n` seeded pool positions outside `exclude` (at most all of them), sorted; the
    same for the whole run or project."""
    free = np.setdiff1d(np.arange(pool_size), np.asarray([] if exclude is None else exclude, dtype=np.int64))
    return np.sort(np.random.default_rng([seed, 3]).choice(free, size=min(n, len(free)), replace=False))


def verdicts(
    preds_R_N: np.ndarray, probs_N_C: torch.Tensor, n_classes: int, n_labeled: int, budget_: int | None
) -> dict[str, tuple[bool, float]]:
    """Every criterion at its defaults, by name (CRITERIA): after the last of the rounds in `preds_R_N`,
    whose stop-set probabilities are `probs_N_C`."""
    return {
        "kappa_average": kappa_average(preds_R_N, n_classes),
        "overall_uncertainty": overall_uncertainty(probs_N_C),
        "classification_change": classification_change(preds_R_N),
        "budget": budget(n_labeled, budget_),
    }


def confusion(a_N: np.ndarray, b_N: np.ndarray, n_classes: int) -> np.ndarray:
    """The C x C counts of (a, b) prediction pairs."""
    pairs = np.asarray(a_N, dtype=np.int64) * n_classes + np.asarray(b_N, dtype=np.int64)
    return np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def cohen_kappa(confusion_C_C: np.ndarray) -> float:
    """Cohen's kappa of two labelings from their confusion; 1.0 where both give one and the same
    class to every sample (kappa is 0/0 there, but the predictions agree perfectly)."""
    counts = np.asarray(confusion_C_C, dtype=np.float64)
    n = counts.sum()
    observed = np.trace(counts) / n
    expected = float(counts.sum(0) @ counts.sum(1)) / n**2
    if expected == 1.0:
        return 1.0
    return float((observed - expected) / (1.0 - expected))


def kappa_average(preds_R_N: np.ndarray, n_classes: int, window: int = 3, kappa: float = 0.99) -> tuple[bool, float]:
    """Bloodgood & Vijay-Shanker (2009): stop when the mean Cohen's kappa between consecutive rounds'
    predictions, over the last `window` pairs, is at least `kappa`. Fewer than `window` pairs: no
    stop, and the value is the mean over the pairs there are (NaN without any)."""
    preds = np.asarray(preds_R_N)
    if preds.ndim < 2 or preds.shape[1] == 0:
        return False, math.nan
    pairs = [
        cohen_kappa(confusion(preds[r - 1], preds[r], n_classes))
        for r in range(max(1, len(preds) - window), len(preds))
    ]
    if not pairs:
        return False, math.nan
    value = float(np.mean(pairs))
    return len(pairs) == window and value >= kappa, value


def overall_uncertainty(probs_N_C: torch.Tensor | np.ndarray, threshold: float = 0.05) -> tuple[bool, float]:
    """Stop when the stop set's mean normalized entropy (entropy / log C, in [0, 1]) is at most `threshold`."""
    p = torch.as_tensor(probs_N_C, dtype=torch.float64)
    n_classes = p.shape[1]
    if len(p) == 0:
        return False, math.nan
    entropy_N = -torch.special.xlogy(p, p).sum(1)
    value = float(entropy_N.mean() / math.log(n_classes)) if n_classes > 1 else 0.0
    return value <= threshold, value


def classification_change(preds_R_N: np.ndarray, threshold: float = 0.0) -> tuple[bool, float]:
    """Stop when the share of the stop set whose predicted class changed in the last round is at
    most `threshold` (default: none changed). Fewer than two rounds: no stop, NaN."""
    preds = np.asarray(preds_R_N)
    if len(preds) < 2 or preds.shape[1] == 0:
        return False, math.nan
    value = float(np.mean(preds[-1] != preds[-2]))
    return value <= threshold, value


def budget(n_labeled: int, budget: int | None) -> tuple[bool, float]:
    """Stop once `budget` labels are spent (None: no budget, never); the value is the labels so far."""
    return budget is not None and n_labeled >= budget, float(n_labeled)
