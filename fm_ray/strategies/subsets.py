"""The one subset mechanism of the opt-in approximations: `--candidates N` (the candidates a
selection may pick: FisherMask, BAIT, k-center, BADGE) and `--fisher-pool N` (the sample F is
estimated from). Each is chosen over all shards by keys of core.approx (a seeded hash of the pool
position, or an uncertainty score): every shard answers its top `n`, the driver merges them, so
the subset is the same on any shard count."""

from __future__ import annotations

import torch

from fm_ray.core.approx import candidate_keys, fisher_pool_keys
from fm_ray.core.scores import top_k
from fm_ray.errors import UserError
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import PoolShard, read_only
from fm_ray.strategies import QueryContext


@read_only
def subset_keys_top(shard: PoolShard, rule: str, seed: int, round: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's `n` highest keys among its unlabeled members, with their global indices (ties
    to the lower index), for the driver to merge: `rule` "fisher_pool" (core.approx.fisher_pool_keys)
    or a candidate rule (core.approx.candidate_keys)."""
    free = ~shard.labeled_N
    index = shard.index_N[free]
    if rule == "fisher_pool":
        keys = fisher_pool_keys(seed, round, index)
    else:
        keys = candidate_keys(rule, seed, round, index, None if rule == "uniform" else shard.predictions()[0][free])
    return top_k(keys.cpu(), index, n)


def subset(pool: ShardedPool, ctx: QueryContext, rule: str, n: int | None) -> torch.Tensor | None:
    """The `n` unlabeled pool positions with the highest keys under `rule`, chosen over all shards
    (sorted); None where `n` is None or covers every unlabeled sample (exact)."""
    if n is None or n >= ctx.pool_size - len(ctx.labeled):
        return None
    answers = pool.map(subset_keys_top, rule, ctx.seed, ctx.round, n)
    _, chosen = top_k(torch.cat([k for k, _ in answers]), torch.cat([i for _, i in answers]), n)
    return chosen.sort().values


def candidates(pool: ShardedPool, ctx: QueryContext, picks: int) -> torch.Tensor | None:
    """This round's `--candidates` (None: every unlabeled sample); a UserError when they are fewer
    than the `picks` the selection needs."""
    n = ctx.cfg.candidates
    if n is not None and n < picks:
        raise UserError(
            f"--candidates {n} is below the {picks} picks this round needs: raise --candidates or lower --batch"
        )
    return subset(pool, ctx, ctx.cfg.candidate_rule, n)
