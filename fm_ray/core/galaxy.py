"""GALAXY (Zhang et al., ICML 2022, arXiv 2202.01402), as LabelBench's `galaxy.py` runs it.

Per class c, the pool is a chain sorted by the margin `p_c - max_j p_j` (most c-like first). Each
pick draws a class and, on its chain, bisects: the midpoint of the shortest run of unlabeled samples
between two labeled ones that disagree on "is c" (leftmost among the shortest). Without one, the
unlabeled sample nearest an inverted labeled pair (not-c just before c); without that, the unlabeled
sample of highest seeded tiebreak uniform. Unlike LabelBench, which reads the true label of each
pick from the whole train set, a pick here counts as labeled with its predicted class: only the
labels of the labeled set are known.
"""

from __future__ import annotations

import numpy as np
import torch

UNLABELED = -1


def margins(probs_N_C: torch.Tensor) -> torch.Tensor:
    """LabelBench's per-class margins: p_c - max_j p_j + 1e-8 max_j p_j (the top class just above 0)."""
    top_N_1 = probs_N_C.max(1, keepdim=True).values
    return probs_N_C - top_N_1 + 1e-8 * top_N_1


def chains(probs_N_C: torch.Tensor) -> np.ndarray:
    """order_C_N: pool positions by descending margin of class c (ties: lower position first)."""
    m = margins(probs_N_C.double()).numpy()
    return np.stack([np.argsort(-m[:, c], kind="stable") for c in range(m.shape[1])])


def chain_pick(state_M: np.ndarray, tiebreak_M: np.ndarray) -> int:
    """The chain position GALAXY queries; `state_M`: -1 unlabeled, 1 labeled c, 0 labeled not c."""
    labeled = np.flatnonzero(state_M >= 0)
    a, b = labeled[:-1], labeled[1:]
    cut = (state_M[a] != state_M[b]) & (b - a > 1)
    if cut.any():
        gaps = np.where(cut, b - a, len(state_M) + 1)
        j = int(np.argmin(gaps))  # the shortest; the leftmost among equals
        return int((a[j] + 1 + b[j] - 1) // 2)
    unlabeled = np.flatnonzero(state_M < 0)
    best, dist = -1, len(state_M) + 1
    inverted = a[(b == a + 1) & (state_M[a] == 0) & (state_M[b] == 1)]
    for i in inverted:  # before the 0: the nearest unlabeled (ties: the later pair wins)
        left = unlabeled[unlabeled < i]
        if len(left) and i - left[-1] <= dist:
            best, dist = int(left[-1]), int(i - left[-1])
    for i in inverted[::-1] + 1:  # after the 1: replaces only when strictly nearer
        right = unlabeled[unlabeled > i]
        if len(right) and right[0] - i < dist:
            best, dist = int(right[0]), int(right[0] - i)
    if best >= 0:
        return best
    return int(unlabeled[np.argmax(tiebreak_M[unlabeled])])


def galaxy_select(
    probs_N_C: torch.Tensor, labels_N: np.ndarray, k: int, classes_k: np.ndarray, tiebreak_N: torch.Tensor
) -> list[int]:
    """k picks; `labels_N`: the class of each labeled sample, UNLABELED elsewhere; `classes_k`: the
    class whose chain each pick bisects (drawn by the caller, seeded)."""
    order_C_N = chains(probs_N_C)
    predicted_N = probs_N_C.argmax(1).numpy()
    labels = np.asarray(labels_N, dtype=np.int64).copy()
    tiebreak = tiebreak_N.double().numpy()
    picks: list[int] = []
    for c in classes_k[:k]:
        order = order_C_N[int(c)]
        lab = labels[order]
        state_M = np.where(lab < 0, -1, (lab == c).astype(np.int64))
        pos = int(order[chain_pick(state_M, tiebreak[order])])
        picks.append(pos)
        labels[pos] = predicted_N[pos]
    return picks
