"""k-center greedy (Coreset; Sener & Savarese, ICLR 2018) and BADGE (Ash et al., ICLR 2020)."""

from __future__ import annotations

import time

import torch

from fm_ray._internal.log import progress
from fm_ray.core.badge import KMeansPPState, badge_select, gradient_factor
from fm_ray.core.kcenter import KCenterState, kcenter_select
from fm_ray.pool import ShardedPool, state_call
from fm_ray.pool.shard import BLOCK, PoolShard, first_score_range, read_only
from fm_ray.strategies import QueryContext, Selection, Strategy, merge_ranges, register
from fm_ray.strategies.subsets import candidates


@read_only
def labeled_feats(shard: PoolShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features of this shard's labeled members, with their global indices."""
    _, feats = shard.predictions()
    return feats[shard.labeled_N], shard.index_N[shard.labeled_N]


def _rows(shard: PoolShard, chosen: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The rows a diversity state holds and which of them it may pick: every member, the unlabeled
    eligible (None: the cached predictions as they are, no copy), or with `--candidates` those
    alone (a copy of the candidates' rows, bounded by N)."""
    free = ~shard.labeled_N
    if chosen is None:
        return None, free
    rows = torch.nonzero(free & torch.isin(shard.index_N, chosen)).flatten()
    return rows, torch.ones(len(rows), dtype=torch.bool)


def build_kcenter(shard: PoolShard, chosen: torch.Tensor | None) -> None:
    """k-center's state over the cached features (every member, the unlabeled ones eligible), or
    over the candidates' rows alone."""
    _, feats = shard.predictions()
    rows, eligible = _rows(shard, chosen)
    index = shard.index_N if rows is None else shard.index_N[rows]
    shard.state = KCenterState((feats if rows is None else feats[rows]).to(shard.device), index, eligible)


def build_badge(shard: PoolShard, chosen: torch.Tensor | None) -> None:
    """BADGE's gradient embeddings as Kronecker factors: ``g`` (C numbers a row, made block by
    block) and ``h``, the cached features themselves; never the C x E embedding."""
    probs, feats = shard.predictions()
    rows, eligible = _rows(shard, chosen)
    if rows is not None:
        probs, feats = probs[rows], feats[rows]
    g_N_C = torch.empty(probs.shape, dtype=probs.dtype, device=shard.device)
    for lo in range(0, len(probs), BLOCK):  # the one-hot's int64 temporaries: one block at a time
        g_N_C[lo : lo + BLOCK] = gradient_factor(probs[lo : lo + BLOCK].to(shard.device))
    index = shard.index_N if rows is None else shard.index_N[rows]
    shard.state = KMeansPPState(g_N_C, feats.to(shard.device, probs.dtype), index, eligible)


def kcenter_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    labeled = pool.map(labeled_feats)
    feats_L_E = torch.cat([f for f, _ in labeled])
    pool.map(build_kcenter, candidates(pool, ctx, ctx.k))
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    picks = kcenter_select(state_call(pool, KCenterState), ctx.k, feats_L_E, progress)
    timings = {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start}
    return Selection(picks, timings, score_range=merge_ranges(pool.map(first_score_range)))


def badge_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    pool.map(build_badge, candidates(pool, ctx, ctx.k))
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    picks = badge_select(state_call(pool, KMeansPPState), ctx.k, ctx.seed * 100_003 + ctx.round, progress)
    timings = {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start}
    return Selection(picks, timings, score_range=merge_ranges(pool.map(first_score_range)))


register("kcenter", Strategy(kcenter_strategy, doc="k-center greedy on penultimate features"))
register(
    "badge",
    Strategy(badge_strategy, doc="k-means++ seeding on last-layer gradient embeddings"),
)
