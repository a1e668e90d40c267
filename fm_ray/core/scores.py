"""Uncertainty scores over predicted probabilities; higher always means "query this first"."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def entropy(probs_N_C: torch.Tensor) -> torch.Tensor:
    """-sum_c p_c log p_c (0 log 0 = 0)."""
    return -torch.special.xlogy(probs_N_C, probs_N_C).sum(1)


def margin(probs_N_C: torch.Tensor) -> torch.Tensor:
    """Negated gap between the two most likely classes (a small gap is uncertain)."""
    top2 = probs_N_C.topk(2, dim=1).values
    return -(top2[:, 0] - top2[:, 1])


def least_confidence(probs_N_C: torch.Tensor) -> torch.Tensor:
    """1 - max_c p_c."""
    return 1 - probs_N_C.max(1).values


SCORES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "entropy": entropy,
    "margin": margin,
    "least_confidence": least_confidence,
}


def top_k(scores_N: torch.Tensor, index_N: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k highest scores, ties to the lowest global index; (scores_k, index_k) in that order.

    Shard-wise top-k followed by the same top-k over the concatenated answers equals the top-k
    over the whole pool, whatever the partition.
    """
    order = np.lexsort((index_N.numpy(), -scores_N.double().numpy()))[:k]
    sel = torch.from_numpy(order)
    return scores_N[sel], index_N[sel]
