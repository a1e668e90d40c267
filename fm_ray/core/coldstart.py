"""Cold-start selectors on penultimate features: TypiClust (Hacohen et al. 2022, arXiv 2202.02794) and
ProbCover (Yehuda et al. 2022, arXiv 2205.11320), as in avihu111/TypiClust's `typiclust.py`, `prob_cover.py`.

Both see the whole pool's features (gathered to the driver: cold-start pools are small) and pick
from the unlabeled ones; pairwise distances are computed `block` rows at a time, never N x N.
Distances are squared Euclidean for TypiClust (faiss's IndexFlatL2, which the reference uses) and
Euclidean on L2-normalized features for ProbCover (its delta-balls).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans

BLOCK = 1024  # rows of a distance block
EPS = 1e-5  # typicality = 1 / (mean kNN distance + EPS), as the reference
MAX_CLUSTERS = 500  # the reference's cap on TypiClust's clusters
MIN_CLUSTER_SIZE = 5  # clusters this small or smaller are skipped (the reference's rule), while larger ones exist


def typicality(feats_N_E: torch.Tensor, k: int, block: int = BLOCK) -> torch.Tensor:
    """1 / (mean squared distance to the k nearest other samples + EPS), per sample."""
    n = len(feats_N_E)
    k = min(k, n - 1)
    if k < 1:
        return torch.ones(n, dtype=feats_N_E.dtype)
    out = []
    for start in range(0, n, block):
        rows = feats_N_E[start : start + block]
        d_B_N = torch.cdist(rows, feats_N_E).square()
        d_B_N[torch.arange(len(rows)), torch.arange(start, start + len(rows))] = torch.inf  # not itself
        out.append(1.0 / (d_B_N.topk(k, dim=1, largest=False).values.mean(1) + EPS))
    return torch.cat(out)


def kmeans_labels(feats_N_E: torch.Tensor, n_clusters: int, seed: int) -> np.ndarray:
    """scikit-learn's KMeans (k-means++ start, seeded), cluster of each sample."""
    km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed)
    return km.fit_predict(feats_N_E.double().numpy())


def typiclust_select(
    feats_N_E: torch.Tensor, labeled_N: torch.Tensor, k: int, seed: int, knn: int = 20, max_clusters: int = MAX_CLUSTERS
) -> list[int]:
    """TypiClust: |L| + k clusters (at most `max_clusters`); clusters ordered by (labeled count, -size);
    from each in turn, round robin, its most typical unlabeled sample (typicality among the cluster's
    unlabeled samples not yet picked, over min(knn, their count // 2) neighbours)."""
    n, feats_N_E = len(feats_N_E), feats_N_E.double()
    clusters_N = kmeans_labels(feats_N_E, min(int(labeled_N.sum()) + k, max_clusters, n), seed)
    labeled = labeled_N.numpy()
    ids, sizes = np.unique(clusters_N, return_counts=True)
    counts = np.bincount(clusters_N[labeled], minlength=ids.max() + 1)[ids]
    everyone = [c for _, _, c in sorted(zip(counts, -sizes, ids, strict=True))]
    order = [c for c in everyone if sizes[np.searchsorted(ids, c)] > MIN_CLUSTER_SIZE] or everyone
    open_N = clusters_N.copy()
    open_N[labeled] = -1  # labeled and picked samples leave their cluster
    picks: list[int] = []
    turn = 0
    while len(picks) < k:
        if not np.isin(order, open_N).any():  # the kept clusters are used up: the small ones too
            order, turn = everyone, 0
        members = np.flatnonzero(open_N == order[turn % len(order)])
        turn += 1
        if not len(members):
            continue
        typ = typicality(feats_N_E[torch.from_numpy(members)], max(1, min(knn, len(members) // 2)))
        best = int(members[int(typ.argmax())])
        picks.append(best)
        open_N[best] = -1
    return picks


def delta_graph(feats_N_E: torch.Tensor, delta: float, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """ProbCover's graph as edges (x_M, y_M): y lies in x's delta-ball (distance < delta; x covers itself)."""
    xs, ys = [], []
    for start in range(0, len(feats_N_E), block):
        near = torch.cdist(feats_N_E[start : start + block], feats_N_E) < delta
        x, y = near.nonzero(as_tuple=True)
        xs.append(x + start)
        ys.append(y)
    if not xs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ys)


def probcover_select(
    feats_N_E: torch.Tensor, labeled_N: torch.Tensor, k: int, delta: float, tiebreak_N: torch.Tensor
) -> list[int]:
    """ProbCover's greedy max coverage: each pick the unlabeled sample whose delta-ball holds the most
    samples not yet covered (by the labeled set or earlier picks; lowest index among ties). Once
    nothing new can be covered, the rest go by `tiebreak_N` (seeded uniforms), highest first."""
    n = len(feats_N_E)
    x, y = delta_graph(torch.nn.functional.normalize(feats_N_E.double(), dim=1), delta)
    covered = torch.zeros(n, dtype=torch.bool)
    covered[y[labeled_N[x]]] = True
    keep = ~covered[y]
    x, y = x[keep], y[keep]
    taken = labeled_N.clone()
    picks: list[int] = []
    while len(picks) < k:
        degree = torch.bincount(x, minlength=n)
        degree[taken] = -1
        best = int(degree.argmax())
        if degree[best] <= 0:
            rest = torch.where(taken, -torch.inf, tiebreak_N.double()).argsort(descending=True, stable=True)
            picks += [int(i) for i in rest[: k - len(picks)]]
            break
        picks.append(best)
        taken[best] = True
        newly = torch.zeros(n, dtype=torch.bool)
        newly[y[x == best]] = True
        keep = ~newly[y]
        x, y = x[keep], y[keep]
    return picks
