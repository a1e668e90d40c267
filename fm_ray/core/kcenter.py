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

from fm_ray.core.greedy import Progress, ShardBest, StateCall, best_of, blockwise_best, no_progress

_CHUNK_ELEMS = 1 << 22  # elements of one (rows x centers x E) difference block


def update_min_sq_dist(out_N: Tensor, feats_N_E: Tensor, centers_L_E: Tensor) -> None:
    """``out_N = min(out_N, min_l sum_e (x_e - c_le)^2)`` per row of ``feats_N_E``, in place.

    Blocks of rows and of centers bound the temporary to ``_CHUNK_ELEMS`` elements (at least one
    row and one center), however many centers there are; the minimum does not depend on the blocks.
    """
    N, E = feats_N_E.shape
    L = centers_L_E.shape[0]
    cols = max(1, min(L, _CHUNK_ELEMS // max(E, 1)))
    rows = max(1, _CHUNK_ELEMS // max(cols * E, 1))
    for lo in range(0, N if L else 0, rows):
        for c in range(0, L, cols):
            diff = feats_N_E[lo : lo + rows, None, :] - centers_L_E[None, c : c + cols, :]
            near = diff.mul_(diff).sum(-1).min(dim=1).values
            torch.minimum(out_N[lo : lo + rows], near, out=out_N[lo : lo + rows])


def min_sq_dist(feats_N_E: Tensor, centers_L_E: Tensor) -> Tensor:
    """``min_l sum_e (x_e - c_le)^2`` per row of ``feats_N_E`` (``+inf`` if no centers), shape (N,)."""
    out_N = torch.full((feats_N_E.shape[0],), math.inf, dtype=feats_N_E.dtype, device=feats_N_E.device)
    update_min_sq_dist(out_N, feats_N_E, centers_L_E)
    return out_N


def block_rows(E: int) -> int:
    """Rows a state updates and ranks at once: one center's difference block (``_CHUNK_ELEMS``)."""
    return max(1, _CHUNK_ELEMS // max(E, 1))


class KCenterState:
    """One shard's rows for k-center greedy: its distances, updated and ranked a block of rows at a
    time, so a step's temporaries do not grow with the shard.

    Args:
        feats_N_E: penultimate-layer features of the rows (held, not copied: a shard passes its
            cached predictions' features, every member, and marks the candidates ``eligible_N``).
        index_N: their global pool indices (int64).
        eligible_N: the rows that may be picked (the candidates); None: every row.
    """

    def __init__(self, feats_N_E: Tensor, index_N: Tensor, eligible_N: Tensor | None = None) -> None:
        device = feats_N_E.device
        self.feats_N_E = feats_N_E
        self.index_N = torch.as_tensor(index_N, dtype=torch.int64, device=device)
        N = len(self.index_N)
        self.eligible_N = (
            torch.ones(N, dtype=torch.bool, device=device) if eligible_N is None else eligible_N.to(device)
        )
        self.chosen_N = torch.zeros(N, dtype=torch.bool, device=device)
        self.dist_N = torch.full((N,), math.inf, dtype=feats_N_E.dtype, device=device)
        self.first_range: tuple[float, float] | None = None  # the first finite distances ranked

    def init(self, labeled_feats_L_E: Tensor) -> None:
        """Distance of every row to its nearest labeled point."""
        self.chosen_N.zero_()
        self.first_range = None
        self.dist_N.fill_(math.inf)
        update_min_sq_dist(self.dist_N, self.feats_N_E, labeled_feats_L_E.to(self.feats_N_E))

    def step(self, chosen: tuple[int, Tensor] | None) -> ShardBest:
        """Add the previous pick ``(global index, feature)`` as a center; answer the farthest."""
        index, center_1_E = (-1, None) if chosen is None else (chosen[0], chosen[1].to(self.feats_N_E)[None])
        ranged, finite = self.first_range is None, False

        def block(sl: slice) -> tuple[Tensor, Tensor]:
            nonlocal finite
            dist_b = self.dist_N[sl]
            if center_1_E is not None:
                self.chosen_N[sl] |= self.index_N[sl] == index
                update_min_sq_dist(dist_b, self.feats_N_E[sl], center_1_E)
            if ranged and not finite:
                finite = bool((dist_b.isfinite() & self.eligible_N[sl]).any())
            return dist_b, self.eligible_N[sl] & ~self.chosen_N[sl]

        pos, dist, first = blockwise_best(block, self.index_N, block_rows(self.feats_N_E.shape[1]), ranged)
        if ranged and finite:  # no labeled set: all inf at first
            self.first_range = first
        if pos < 0:
            return ShardBest(-math.inf, -1)
        return ShardBest(dist, int(self.index_N[pos]), self.feats_N_E[pos].clone())


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
