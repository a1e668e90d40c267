"""Shard-wise k-center greedy (Coreset; Sener & Savarese, ICLR 2018).

Repeatedly add the candidate farthest (squared Euclidean) from its nearest labeled or chosen
center. Squared distances are summed elementwise, ``sum_e (x_e - c_e)^2``, not via
``|x|^2 + |c|^2 - 2 x.c``, so a candidate's distance does not depend on how the pool is batched.
Without labeled points every distance is ``+inf`` and the first pick is the lowest global index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fm_ray.core.greedy import Progress, ShardBest, StateCall, best_of, local_best, no_progress, score_range

_CHUNK_ELEMS = 1 << 22  # elements of one (rows x centers x E) difference block


def min_sq_dist(feats_N_E: Tensor, centers_L_E: Tensor) -> Tensor:
    """``min_l sum_e (x_e - c_le)^2`` per row of ``feats_N_E`` (``+inf`` if no centers), shape (N,).

    Blocks of rows and of centers bound the temporary to ``_CHUNK_ELEMS`` elements (at least one
    row and one center), however many centers there are; the minimum does not depend on the blocks.
    """
    N, E = feats_N_E.shape
    out_N = torch.full((N,), math.inf, dtype=feats_N_E.dtype, device=feats_N_E.device)
    L = centers_L_E.shape[0]
    cols = max(1, min(L, _CHUNK_ELEMS // max(E, 1)))
    rows = max(1, _CHUNK_ELEMS // max(cols * E, 1))
    for lo in range(0, N if L else 0, rows):
        for c in range(0, L, cols):
            diff = feats_N_E[lo : lo + rows, None, :] - centers_L_E[None, c : c + cols, :]
            out_N[lo : lo + rows] = torch.minimum(out_N[lo : lo + rows], (diff * diff).sum(-1).min(dim=1).values)
    return out_N


class KCenterState:
    """One shard's candidates for k-center greedy.

    Args:
        feats_N_E: penultimate-layer features of this shard's candidates.
        index_N: their global pool indices (int64).
    """

    def __init__(self, feats_N_E: Tensor, index_N: Tensor) -> None:
        self.feats_N_E = feats_N_E
        self.index_N = torch.as_tensor(index_N, dtype=torch.int64, device=feats_N_E.device)
        self.chosen_N = torch.zeros(len(self.index_N), dtype=torch.bool, device=feats_N_E.device)
        self.dist_N = torch.full(
            (len(self.index_N),),
            math.inf,
            dtype=feats_N_E.dtype,
            device=feats_N_E.device,
        )
        self.first_range: tuple[float, float] | None = None  # the first finite distances ranked

    def init(self, labeled_feats_L_E: Tensor) -> None:
        """Distance of every candidate to its nearest labeled point."""
        self.chosen_N.zero_()
        self.first_range = None
        self.dist_N = min_sq_dist(self.feats_N_E, labeled_feats_L_E.to(self.feats_N_E))

    def step(self, chosen: tuple[int, Tensor] | None) -> ShardBest:
        """Add the previous pick ``(global index, feature)`` as a center; answer the farthest."""
        if chosen is not None:
            index, feat_E = chosen
            self.chosen_N |= self.index_N == index
            new_N = min_sq_dist(self.feats_N_E, feat_E.to(self.feats_N_E)[None])
            self.dist_N = torch.minimum(self.dist_N, new_N)
        if self.first_range is None and bool(self.dist_N.isfinite().any()):  # no labeled set: all inf at first
            self.first_range = score_range(self.dist_N, ~self.chosen_N)
        pos = local_best(self.dist_N, ~self.chosen_N, self.index_N)
        if pos < 0:
            return ShardBest(-math.inf, -1)
        return ShardBest(float(self.dist_N[pos]), int(self.index_N[pos]), self.feats_N_E[pos].clone())


def kcenter_select(
    call: StateCall[KCenterState], K: int, labeled_feats_L_E: Tensor, progress: Progress = no_progress
) -> list[int]:
    """k-center greedy over ``KCenterState`` shards; ``K`` global indices in selection order.

    Args:
        call: runs a function on every shard's ``KCenterState``.
        K: batch size.
        labeled_feats_L_E: features of the labeled set (may have zero rows).
    """
    call(KCenterState.init, labeled_feats_L_E)
    chosen: list[int] = []
    message: tuple[int, Tensor] | None = None
    for _ in progress(range(K), "k-center selection", unit="pick"):
        best = best_of(call(KCenterState.step, message))
        if best.index < 0:
            break
        assert best.emb is not None
        chosen.append(best.index)
        message = (best.index, best.emb)
    return chosen
