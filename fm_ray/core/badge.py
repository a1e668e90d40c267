"""BADGE: gradient embeddings + shard-wise k-means++ seeding (Ash et al., ICLR 2020).

The embedding of ``x`` is the gradient of the cross-entropy at the predicted label ``yhat`` with
respect to the last-layer weight: ``g kron h`` with ``g = p - e_yhat`` (row-major weight index
``c * E + e``). It is never materialized (N x C E is the size of the last layer times the pool):
shards keep ``g`` (C) and ``h`` (E) per candidate and use
``|g_x kron h_x - g_y kron h_y|^2 = |g_x|^2 |h_x|^2 + |g_y|^2 |h_y|^2 - 2 (g_x . g_y)(h_x . h_y)``.
Seeding starts from the largest-norm embedding (as BADGE's code) and then draws with probability
proportional to ``D^2(x)``, the squared distance to the nearest chosen center. The draw is an
exponential race: ``argmin_x E_x / D^2(x)`` with ``E_x = -log U_x`` and ``U_x`` a counter-based
uniform keyed by (seed, step, global index), so every partition of the pool gives the same picks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fm_ray.core.greedy import Progress, ShardBest, StateCall, best_of, local_best, no_progress, score_range
from fm_ray.core.random import hash_uniform

_CHUNK_ELEMS = 1 << 22  # elements of one (rows x E) product block


def badge_factors(probs_N_C: Tensor, feats_N_E: Tensor) -> tuple[Tensor, Tensor]:
    """``(g_N_C, h_N_E)``: the embedding of row ``x`` is ``g_x kron h_x``.

    Args:
        probs_N_C: softmax probabilities; ``yhat`` = argmax (first maximum on ties).
        feats_N_E: penultimate-layer features ``h``.
    """
    C = probs_N_C.shape[1]
    onehot_N_C = torch.nn.functional.one_hot(probs_N_C.argmax(dim=1), C).to(probs_N_C)
    return probs_N_C - onehot_N_C, feats_N_E.to(probs_N_C)


def badge_embeddings(probs_N_C: Tensor, feats_N_E: Tensor) -> Tensor:
    """Last-layer cross-entropy gradients at the predicted label, shape (N, C * E), materialized
    (the reference for the factorized distances; selection never builds it)."""
    g_N_C, h_N_E = badge_factors(probs_N_C, feats_N_E)
    return (g_N_C[:, :, None] * h_N_E[:, None, :]).reshape(len(g_N_C), -1)


def _rowdot(a_N_K: Tensor, b_K: Tensor) -> Tensor:
    """``a_N_K @ b_K`` as an elementwise row sum, in row blocks: the same bits for any N or block."""
    out_N = a_N_K.new_empty(a_N_K.shape[0])
    rows = max(1, _CHUNK_ELEMS // max(a_N_K.shape[1], 1))
    for lo in range(0, a_N_K.shape[0], rows):
        out_N[lo : lo + rows] = (a_N_K[lo : lo + rows] * b_K).sum(-1)
    return out_N


def kron_sq_dist(
    g_N_C: Tensor, h_N_E: Tensor, gg_N: Tensor, hh_N: Tensor, g_C: Tensor, h_E: Tensor, gg: Tensor, hh: Tensor
) -> Tensor:
    """``|g_x kron h_x - g kron h|^2`` per row without forming a Kronecker product, clamped at 0.

    ``gg_N, hh_N, gg, hh`` are the squared norms computed with the same row sums, so a candidate
    identical to the center gets exactly 0.
    """
    cross_N = _rowdot(g_N_C, g_C) * _rowdot(h_N_E, h_E)
    return (gg_N * hh_N + gg * hh - 2 * cross_N).clamp_min(0)


class KMeansPPState:
    """One shard's candidates for k-means++ seeding, as Kronecker factors (float64: the factorized
    distance subtracts large terms, and the factors are small: C + E numbers per candidate).

    Args:
        g_N_C: ``p - e_yhat`` of this shard's candidates (see :func:`badge_factors`).
        h_N_E: their penultimate features.
        index_N: their global pool indices (int64).
    """

    def __init__(self, g_N_C: Tensor, h_N_E: Tensor, index_N: Tensor) -> None:
        self.g_N_C, self.h_N_E = g_N_C.double(), h_N_E.double()
        self.gg_N = _rowdot(self.g_N_C * self.g_N_C, self.g_N_C.new_ones(self.g_N_C.shape[1]))
        self.hh_N = _rowdot(self.h_N_E * self.h_N_E, self.h_N_E.new_ones(self.h_N_E.shape[1]))
        device = g_N_C.device
        self.index_N = torch.as_tensor(index_N, dtype=torch.int64, device=device)
        self.chosen_N = torch.zeros(len(self.index_N), dtype=torch.bool, device=device)
        self.d2_N = torch.full((len(self.index_N),), math.inf, dtype=torch.float64, device=device)
        self.first_range: tuple[float, float] | None = None  # squared norms the first center is chosen by

    def first(self) -> ShardBest:
        """Reset; answer the largest squared norm (the first center)."""
        self.chosen_N.zero_()
        self.d2_N = torch.full_like(self.d2_N, math.inf)
        norm_N = self.gg_N * self.hh_N
        self.first_range = score_range(norm_N, ~self.chosen_N)
        return self._answer(norm_N)

    def step(self, chosen: tuple[int, Tensor], seed: int, step_index: int) -> ShardBest:
        """Add the previous center ``(global index, cat(g, h, |g|^2, |h|^2))``; answer this shard's race winner.

        The score is ``-E_x / D^2(x)`` (maximized); chosen points are never eligible.
        """
        index, gh = chosen
        C = self.g_N_C.shape[1]
        gh = gh.to(self.g_N_C)
        g_C, h_E, gg, hh = gh[:C], gh[C:-2], gh[-2], gh[-1]  # the owner's norms: D^2 to itself is exactly 0
        self.chosen_N |= self.index_N == index
        new_N = kron_sq_dist(self.g_N_C, self.h_N_E, self.gg_N, self.hh_N, g_C, h_E, gg, hh)
        self.d2_N = torch.minimum(self.d2_N, new_N)
        expo_N = -torch.log(hash_uniform(seed, step_index, self.index_N)).to(self.d2_N)
        score_N = -expo_N / self.d2_N  # D^2 = 0 -> -inf: only drawn when nothing else is
        return self._answer(score_N)

    def _answer(self, score_N: Tensor) -> ShardBest:
        pos = local_best(score_N, ~self.chosen_N, self.index_N)
        if pos < 0:
            return ShardBest(-math.inf, -1)
        center = torch.cat([self.g_N_C[pos], self.h_N_E[pos], self.gg_N[pos, None], self.hh_N[pos, None]])
        return ShardBest(float(score_N[pos]), int(self.index_N[pos]), center)


def badge_select(call: StateCall[KMeansPPState], K: int, seed: int, progress: Progress = no_progress) -> list[int]:
    """k-means++ seeding over ``KMeansPPState`` shards; ``K`` global indices in selection order.

    Args:
        call: runs a function on every shard's ``KMeansPPState``.
        K: batch size.
        seed: seed of the D^2 draws (same seed, same picks, whatever the sharding).
    """
    chosen: list[int] = []
    best = best_of(call(KMeansPPState.first))
    bar = iter(progress(range(K), "BADGE selection", unit="pick"))
    while best.index >= 0 and len(chosen) < K:
        next(bar, None)
        assert best.emb is not None
        chosen.append(best.index)
        if len(chosen) < K:
            best = best_of(call(KMeansPPState.step, (best.index, best.emb), seed, len(chosen)))
    return chosen
