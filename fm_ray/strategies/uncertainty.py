"""Random and the uncertainty baselines (entropy, margin, least confidence)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from fm_ray.core.scores import SCORES, top_k
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import PoolShard, read_only
from fm_ray.strategies import QueryContext, Selection, Strategy, register


def random_select(pool: ShardedPool, ctx: QueryContext) -> Selection:
    free = np.setdiff1d(np.arange(ctx.pool_size), ctx.labeled)
    rng = np.random.default_rng([ctx.seed, 2, ctx.round])
    return Selection(sorted(int(i) for i in rng.choice(free, size=ctx.k, replace=False)))


@read_only
def top_scores(shard: PoolShard, score: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's k highest `score`s among unlabeled members, with their global indices."""
    probs, _ = shard.predictions()
    free = ~shard.labeled_N
    return top_k(SCORES[score](probs[free]), shard.index_N[free], k)


def _uncertainty(score: str) -> Callable[[ShardedPool, QueryContext], Selection]:
    def select(pool: ShardedPool, ctx: QueryContext) -> Selection:
        start = time.perf_counter()
        answers = pool.map(top_scores, score, ctx.k)  # each shard: its own top k
        scores_all = torch.cat([s for s, _ in answers])
        index_all = torch.cat([i for _, i in answers])
        _, picked = top_k(scores_all, index_all, ctx.k)
        return Selection([int(i) for i in picked], {"select_seconds": time.perf_counter() - start})

    return select


register(
    "random",
    Strategy(random_select, needs_model=False, doc="uniform over the unlabeled pool"),
)
for _name in SCORES:
    register(_name, Strategy(_uncertainty(_name), doc=f"highest {_name} score"))
