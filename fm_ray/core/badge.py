"""BADGE: gradient embeddings + shard-wise k-means++ seeding (Ash et al., ICLR 2020).

The embedding of ``x`` is the gradient of the cross-entropy at the predicted label ``yhat`` with
respect to the last-layer weight: ``(p - e_yhat) kron h`` (row-major weight index ``c * E + e``).
Seeding starts from the largest-norm embedding (as BADGE's code) and then draws with probability
proportional to ``D^2(x)``, the squared distance to the nearest chosen center. The draw is an
exponential race: ``argmin_x E_x / D^2(x)`` with ``E_x = -log U_x`` and ``U_x`` a counter-based
uniform keyed by (seed, step, global index), so every partition of the pool gives the same picks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fm_ray.core.greedy import ShardBest, ShardCall, best_of, local_best
from fm_ray.core.kcenter import min_sq_dist
from fm_ray.core.random import hash_uniform


def badge_embeddings(probs_N_C: Tensor, feats_N_E: Tensor) -> Tensor:
    """Last-layer cross-entropy gradients at the predicted label, shape (N, C * E).

    Args:
        probs_N_C: softmax probabilities; ``yhat`` = argmax (first maximum on ties).
        feats_N_E: penultimate-layer features ``h``.
    """
    N, C = probs_N_C.shape
    onehot_N_C = torch.nn.functional.one_hot(probs_N_C.argmax(dim=1), C).to(probs_N_C)
    g_N_C = probs_N_C - onehot_N_C
    return (g_N_C[:, :, None] * feats_N_E[:, None, :].to(probs_N_C)).reshape(N, -1)


class KMeansPPState:
    """One shard's candidates for k-means++ seeding.

    Args:
        emb_N_D: BADGE embeddings of this shard's candidates.
        index_N: their global pool indices (int64).
    """

    def __init__(self, emb_N_D: Tensor, index_N: Tensor) -> None:
        self.emb_N_D = emb_N_D
        self.index_N = torch.as_tensor(index_N, dtype=torch.int64, device=emb_N_D.device)
        self.chosen_N = torch.zeros(len(self.index_N), dtype=torch.bool, device=emb_N_D.device)
        self.d2_N = torch.full((len(self.index_N),), math.inf, dtype=emb_N_D.dtype, device=emb_N_D.device)

    def first(self) -> ShardBest:
        """Reset; answer the largest squared norm (the first center)."""
        self.chosen_N.zero_()
        self.d2_N = torch.full_like(self.d2_N, math.inf)
        return self._answer((self.emb_N_D * self.emb_N_D).sum(-1))

    def step(self, chosen: tuple[int, Tensor], seed: int, step_index: int) -> ShardBest:
        """Add the previous center ``(global index, emb)``; answer this shard's race winner.

        The score is ``-E_x / D^2(x)`` (maximized); chosen points are never eligible.
        """
        index, emb_D = chosen
        self.chosen_N |= self.index_N == index
        new_N = min_sq_dist(self.emb_N_D, emb_D.to(self.emb_N_D)[None])
        self.d2_N = torch.minimum(self.d2_N, new_N)
        expo_N = -torch.log(hash_uniform(seed, step_index, self.index_N))
        score_N = -expo_N / self.d2_N.to(expo_N)  # D^2 = 0 -> -inf: only drawn when nothing else is
        return self._answer(score_N)

    def _answer(self, score_N: Tensor) -> ShardBest:
        pos = local_best(score_N, ~self.chosen_N, self.index_N)
        if pos < 0:
            return ShardBest(-math.inf, -1)
        return ShardBest(float(score_N[pos]), int(self.index_N[pos]), self.emb_N_D[pos].clone())


def badge_select(call: ShardCall, K: int, seed: int) -> list[int]:
    """k-means++ seeding over ``KMeansPPState`` shards; ``K`` global indices in selection order.

    Args:
        call: ShardCall over ``KMeansPPState`` shards.
        K: batch size.
        seed: seed of the D^2 draws (same seed, same picks, whatever the sharding).
    """
    chosen: list[int] = []
    best = best_of(call("first"))
    while best.index >= 0 and len(chosen) < K:
        assert best.emb is not None
        chosen.append(best.index)
        if len(chosen) < K:
            best = best_of(call("step", (best.index, best.emb), seed, len(chosen)))
    return chosen
