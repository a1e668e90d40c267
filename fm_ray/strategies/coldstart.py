"""Cold-start selectors: TypiClust (Hacohen et al., ICML 2022) and ProbCover (Yehuda et al., NeurIPS 2022).

They need no labels (an `--init-strategy`), only the penultimate features of the pool, which the
shards compute and the driver gathers (E numbers a sample: cold-start pools are small); the math is
in fm_ray/core/coldstart.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fm_ray.core.coldstart import probcover_select, typiclust_select
from fm_ray.core.random import hash_uniform
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import PoolShard, read_only
from fm_ray.strategies import QueryContext, Selection, Strategy, register


@read_only
def member_feats(shard: PoolShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's global position and penultimate features."""
    _, feats = shard.predictions()
    return shard.index_N, feats


def pool_feats(pool: ShardedPool, ctx: QueryContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole pool's features by pool position, and which positions are labeled."""
    answers = pool.map(member_feats)
    index = torch.cat([i for i, _ in answers])
    feats_N_E = torch.empty(ctx.pool_size, answers[0][1].shape[1], dtype=answers[0][1].dtype)
    feats_N_E[index] = torch.cat([f for _, f in answers])
    labeled_N = torch.zeros(ctx.pool_size, dtype=torch.bool)
    labeled_N[torch.from_numpy(ctx.labeled)] = True
    return feats_N_E, labeled_N


def _timed(
    pick: Callable[[torch.Tensor, torch.Tensor, QueryContext], list[int]],
) -> Callable[[ShardedPool, QueryContext], Selection]:
    """A strategy: the pool's features gathered, then `pick` on them."""

    def select(pool: ShardedPool, ctx: QueryContext) -> Selection:
        start = time.perf_counter()
        feats_N_E, labeled_N = pool_feats(pool, ctx)
        embed_s = time.perf_counter() - start
        start = time.perf_counter()
        picks = pick(feats_N_E, labeled_N, ctx)
        return Selection(picks, {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start})

    return select


def _typiclust(feats_N_E: torch.Tensor, labeled_N: torch.Tensor, ctx: QueryContext) -> list[int]:
    return typiclust_select(feats_N_E, labeled_N, ctx.k, seed=ctx.seed * 100_003 + ctx.round)


def _probcover(feats_N_E: torch.Tensor, labeled_N: torch.Tensor, ctx: QueryContext) -> list[int]:
    tiebreak_N = hash_uniform(ctx.seed, ctx.round, torch.arange(ctx.pool_size))
    return probcover_select(feats_N_E, labeled_N, ctx.k, ctx.cfg.probcover_delta, tiebreak_N)


register(
    "typiclust",
    Strategy(
        _timed(_typiclust),
        doc="most typical sample of the least-labeled k-means clusters (Hacohen et al. 2022, arXiv 2202.02794)",
        cold_start=True,
    ),
)
register(
    "probcover",
    Strategy(
        _timed(_probcover),
        doc="greedy max coverage of delta-balls on normalized features (Yehuda et al. 2022, arXiv 2205.11320)",
        cold_start=True,
    ),
)
