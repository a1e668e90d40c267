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

from fm_ray.core.greedy import Progress, ShardBest, StateCall, best_of, blockwise_best, no_progress
from fm_ray.core.random import hash_uniform

_CHUNK_ELEMS = 1 << 22  # elements of one (rows x E) product block
_BLOCK_ELEMS = 1 << 20  # factor elements of the rows a state promotes to float64 at once


def badge_factors(probs_N_C: Tensor, feats_N_E: Tensor) -> tuple[Tensor, Tensor]:
    """``(g_N_C, h_N_E)``: the embedding of row ``x`` is ``g_x kron h_x``.

    Args:
        probs_N_C: softmax probabilities; ``yhat`` = argmax (first maximum on ties).
        feats_N_E: penultimate-layer features ``h``.
    """
    return gradient_factor(probs_N_C), feats_N_E.to(probs_N_C)


def gradient_factor(probs_N_C: Tensor) -> Tensor:
    """``g = p - e_yhat`` per row (``yhat`` = argmax, first maximum on ties)."""
    onehot_N_C = torch.nn.functional.one_hot(probs_N_C.argmax(dim=1), probs_N_C.shape[1]).to(probs_N_C)
    return probs_N_C - onehot_N_C


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


def block_rows(C: int, E: int) -> int:
    """Rows a state promotes to float64 and scores at once (``_BLOCK_ELEMS`` factor elements)."""
    return max(1, _BLOCK_ELEMS // max(C + E, 1))


class KMeansPPState:
    """One shard's rows for k-means++ seeding, as Kronecker factors, scored a block of rows at a time.

    The factorized distance subtracts large terms, so it is computed in float64; the factors are
    held as given (a shard's ``h`` is its cached features, not a copy) and promoted one block at a
    time, with the same bits as promoting them whole. Held per row: ``g`` (C numbers), ``h`` (E),
    ``|g|^2``, ``|h|^2`` and ``D^2`` (float64).

    Args:
        g_N_C: ``p - e_yhat`` of the rows (see :func:`badge_factors`).
        h_N_E: their penultimate features.
        index_N: their global pool indices (int64).
        eligible_N: the rows that may be picked (the candidates); None: every row.
    """

    def __init__(self, g_N_C: Tensor, h_N_E: Tensor, index_N: Tensor, eligible_N: Tensor | None = None) -> None:
        device = g_N_C.device
        self.g_N_C, self.h_N_E = g_N_C, h_N_E
        self.index_N = torch.as_tensor(index_N, dtype=torch.int64, device=device)
        N, C, E = len(self.index_N), g_N_C.shape[1], h_N_E.shape[1]
        self.rows = block_rows(C, E)
        self.gg_N = torch.empty(N, dtype=torch.float64, device=device)
        self.hh_N = torch.empty(N, dtype=torch.float64, device=device)
        for lo in range(0, N, self.rows):
            g, h = self._factors(slice(lo, lo + self.rows))
            self.gg_N[lo : lo + self.rows] = _rowdot(g * g, g.new_ones(C))
            self.hh_N[lo : lo + self.rows] = _rowdot(h * h, h.new_ones(E))
        self.eligible_N = (
            torch.ones(N, dtype=torch.bool, device=device) if eligible_N is None else eligible_N.to(device)
        )
        self.chosen_N = torch.zeros(N, dtype=torch.bool, device=device)
        self.d2_N = torch.full((N,), math.inf, dtype=torch.float64, device=device)
        self.first_range: tuple[float, float] | None = None  # squared norms the first center is chosen by

    def _factors(self, sl: slice) -> tuple[Tensor, Tensor]:
        return self.g_N_C[sl].double(), self.h_N_E[sl].double()

    def first(self) -> ShardBest:
        """Reset; answer the largest squared norm (the first center)."""
        self.chosen_N.zero_()
        self.d2_N.fill_(math.inf)

        def block(sl: slice) -> tuple[Tensor, Tensor]:
            return self.gg_N[sl] * self.hh_N[sl], self.eligible_N[sl]

        pos, score, self.first_range = blockwise_best(block, self.index_N, self.rows, ranged=True)
        return self._answer(pos, score)

    def step(self, chosen: tuple[int, Tensor], seed: int, step_index: int) -> ShardBest:
        """Add the previous center ``(global index, cat(g, h, |g|^2, |h|^2))``; answer this shard's race winner.

        The score is ``-E_x / D^2(x)`` (maximized); chosen points are never eligible.
        """
        index, gh = chosen
        C = self.g_N_C.shape[1]
        gh = gh.to(device=self.d2_N.device, dtype=torch.float64)
        g_C, h_E, gg, hh = gh[:C], gh[C:-2], gh[-2], gh[-1]  # the owner's norms: D^2 to itself is exactly 0

        def block(sl: slice) -> tuple[Tensor, Tensor]:
            self.chosen_N[sl] |= self.index_N[sl] == index
            g, h = self._factors(sl)
            new_b = kron_sq_dist(g, h, self.gg_N[sl], self.hh_N[sl], g_C, h_E, gg, hh)
            d2_b = torch.minimum(self.d2_N[sl], new_b, out=self.d2_N[sl])
            expo_b = -torch.log(hash_uniform(seed, step_index, self.index_N[sl])).to(d2_b)
            score_b = -expo_b / d2_b  # D^2 = 0 -> -inf: only drawn when nothing else is
            return score_b, self.eligible_N[sl] & ~self.chosen_N[sl]

        pos, score, _ = blockwise_best(block, self.index_N, self.rows)
        return self._answer(pos, score)

    def _answer(self, pos: int, score: float) -> ShardBest:
        if pos < 0:
            return ShardBest(-math.inf, -1)
        g, h = self._factors(slice(pos, pos + 1))
        center = torch.cat([g[0], h[0], self.gg_N[pos, None], self.hh_N[pos, None]])
        return ShardBest(score, int(self.index_N[pos]), center)


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
