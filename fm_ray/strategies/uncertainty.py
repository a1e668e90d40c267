"""Random and the uncertainty baselines (entropy, margin, least confidence)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from fm_ray.core.greedy import score_range
from fm_ray.core.scores import SCORES, top_k
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import PoolShard, read_only
from fm_ray.strategies import QueryContext, Selection, Strategy, merge_ranges, register


def random_select(pool: ShardedPool, ctx: QueryContext) -> Selection:
    free = np.setdiff1d(np.arange(ctx.pool_size), ctx.labeled)
    rng = np.random.default_rng([ctx.seed, 2, ctx.round])
    return Selection(sorted(int(i) for i in rng.choice(free, size=ctx.k, replace=False)))


@read_only
def top_scores(shard: PoolShard, score: str, k: int) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """This shard's k highest `score`s among unlabeled members, with their global indices, and
    (min, max) of all its candidates' scores."""
    probs, _ = shard.predictions()
    free = ~shard.labeled_N
    scores_N = SCORES[score](probs[free])
    top, index = top_k(scores_N, shard.index_N[free], k)
    return top, index, score_range(scores_N, torch.ones(len(scores_N), dtype=torch.bool))


def _uncertainty(score: str) -> Callable[[ShardedPool, QueryContext], Selection]:
    def select(pool: ShardedPool, ctx: QueryContext) -> Selection:
        start = time.perf_counter()
        answers = pool.map(top_scores, score, ctx.k)  # each shard: its own top k
        scores_all = torch.cat([s for s, _, _ in answers])
        index_all = torch.cat([i for _, i, _ in answers])
        _, picked = top_k(scores_all, index_all, ctx.k)
        return Selection(
            [int(i) for i in picked],
            {"select_seconds": time.perf_counter() - start},
            score_range=merge_ranges([r for _, _, r in answers]),
        )

    return select


register(
    "random",
    Strategy(random_select, needs_model=False, doc="uniform over the unlabeled pool", cold_start=True),
)
for _name in SCORES:
    register(_name, Strategy(_uncertainty(_name), doc=f"highest {_name} score"))
