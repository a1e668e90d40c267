"""k-center greedy (Coreset; Sener & Savarese, ICLR 2018) and BADGE (Ash et al., ICLR 2020)."""

from __future__ import annotations

import time

import torch

from fm_ray._internal.log import progress
from fm_ray.core.badge import KMeansPPState, badge_factors, badge_select
from fm_ray.core.kcenter import KCenterState, kcenter_select
from fm_ray.pool import ShardedPool, state_call
from fm_ray.pool.shard import PoolShard, first_score_range, read_only
from fm_ray.strategies import QueryContext, Selection, Strategy, merge_ranges, register


@read_only
def labeled_feats(shard: PoolShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features of this shard's labeled members, with their global indices."""
    _, feats = shard.predictions()
    return feats[shard.labeled_N], shard.index_N[shard.labeled_N]


def build_kcenter(shard: PoolShard) -> None:
    _, feats = shard.predictions()
    free = ~shard.labeled_N
    shard.state = KCenterState(feats[free].to(shard.device), shard.index_N[free])


def build_badge(shard: PoolShard) -> None:
    """BADGE's gradient embeddings as Kronecker factors (C + E numbers per candidate, not C x E)."""
    probs, feats = shard.predictions()
    free = ~shard.labeled_N
    g_N_C, h_N_E = badge_factors(probs[free].to(shard.device), feats[free].to(shard.device))
    shard.state = KMeansPPState(g_N_C, h_N_E, shard.index_N[free])


def kcenter_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    labeled = pool.map(labeled_feats)
    feats_L_E = torch.cat([f for f, _ in labeled])
    pool.map(build_kcenter)
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    picks = kcenter_select(state_call(pool, KCenterState), ctx.k, feats_L_E, progress)
    timings = {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start}
    return Selection(picks, timings, score_range=merge_ranges(pool.map(first_score_range)))


def badge_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    pool.map(build_badge)
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
