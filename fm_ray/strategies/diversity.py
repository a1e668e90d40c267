"""k-center greedy (Coreset; Sener & Savarese, ICLR 2018) and BADGE (Ash et al., ICLR 2020)."""

from __future__ import annotations

import time

import torch

from fm_ray.core.badge import badge_select
from fm_ray.core.kcenter import kcenter_select
from fm_ray.pool import ShardedPool, state_call
from fm_ray.strategies import QueryContext, Selection, Strategy, register


def kcenter_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    labeled = pool.map("labeled_feats")
    feats_L_E = torch.cat([f for f, _ in labeled])
    pool.map("build_kcenter")
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    picks = kcenter_select(state_call(pool), ctx.k, feats_L_E)
    return Selection(picks, {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start})


def badge_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    pool.map("build_badge")
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    picks = badge_select(state_call(pool), ctx.k, ctx.seed * 100_003 + ctx.round)
    return Selection(picks, {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start})


register("kcenter", Strategy(kcenter_strategy, doc="k-center greedy on penultimate features"))
register(
    "badge",
    Strategy(badge_strategy, doc="k-means++ seeding on last-layer gradient embeddings"),
)
