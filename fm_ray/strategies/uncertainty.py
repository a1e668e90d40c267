"""Random and the score strategies: entropy, margin, least confidence, and BALD (Houlsby et al. 2011,
arXiv 1112.5745; Gal et al. 2017, arXiv 1703.02910) over MC-dropout draws (strategies.mc).

A score strategy takes the k highest scores, or with ``--stochastic`` draws k candidates with
probabilities given by their scores (Kirsch et al. 2023, arXiv 2106.12059; core.stochastic):
power and softmax keys are made on the shards and merged as the scores are, softrank's need the
global ranks, so the shards send every candidate's (score, index), 16 B each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fm_ray.core.bayes import bald_scores
from fm_ray.core.greedy import score_range
from fm_ray.core.memory import Item, Plan
from fm_ray.core.scores import SCORES, top_k
from fm_ray.core.stochastic import stochastic_keys
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import PoolShard, read_only
from fm_ray.strategies import PlanInputs, QueryContext, Selection, Strategy, merge_ranges, register
from fm_ray.strategies.mc import MCDropout, mc_blocks, mc_items


def random_select(pool: ShardedPool, ctx: QueryContext) -> Selection:
    free = np.setdiff1d(np.arange(ctx.pool_size), ctx.labeled)
    rng = np.random.default_rng([ctx.seed, 2, ctx.round])
    return Selection(sorted(int(i) for i in rng.choice(free, size=ctx.k, replace=False)))


@dataclass(frozen=True)
class Draw:
    """A stochastic batch's mode (power | softmax), inverse temperature and noise key."""

    mode: str
    beta: float
    seed: int
    round: int


def free_scores(shard: PoolShard, score: str, mc: MCDropout | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`score` of every unlabeled member (on the CPU) and their global indices; BALD from the
    members' MC draws, block by block."""
    free = ~shard.labeled_N
    if mc is None:
        probs, _ = shard.predictions()
        return SCORES[score](probs[free]), shard.index_N[free]
    parts = [bald_scores(lp_b_T_C).cpu()[free[pos]] for pos, lp_b_T_C in mc_blocks(shard, mc)]
    scores_N = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return scores_N, shard.index_N[free]


@read_only
def top_scores(
    shard: PoolShard, score: str, k: int, mc: MCDropout | None = None, draw: Draw | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """This shard's k highest `score`s (or stochastic keys, with `draw`) among unlabeled members,
    with their global indices, and (min, max) of all its candidates' scores."""
    scores_N, index_N = free_scores(shard, score, mc)
    keys_N = (
        scores_N if draw is None else stochastic_keys(scores_N, index_N, draw.mode, draw.beta, draw.seed, draw.round)
    )
    top, index = top_k(keys_N, index_N, k)
    return top, index, score_range(scores_N, torch.ones(len(scores_N), dtype=torch.bool))


@read_only
def all_scores(shard: PoolShard, score: str, mc: MCDropout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unlabeled member's `score` (float64) and global index: what softrank ranks."""
    scores_N, index_N = free_scores(shard, score, mc)
    return scores_N.double(), index_N


def _score_strategy(score: str) -> Callable[[ShardedPool, QueryContext], Selection]:
    def select(pool: ShardedPool, ctx: QueryContext) -> Selection:
        start = time.perf_counter()
        cfg = ctx.cfg
        ranges: list[tuple[float, float] | None]
        mc = MCDropout.of(ctx) if score == "bald" else None
        if cfg.stochastic == "softrank":
            gathered = pool.map(all_scores, score, mc)
            scores_all, index_all = torch.cat([s for s, _ in gathered]), torch.cat([i for _, i in gathered])
            keys_all = stochastic_keys(scores_all, index_all, "softrank", cfg.beta, ctx.seed, ctx.round)
            ranges = [score_range(s, torch.ones(len(s), dtype=torch.bool)) for s, _ in gathered]
        else:
            draw = None if cfg.stochastic is None else Draw(cfg.stochastic, cfg.beta, ctx.seed, ctx.round)
            answers = pool.map(top_scores, score, ctx.k, mc, draw)  # each shard: its own top k
            keys_all = torch.cat([s for s, _, _ in answers])
            index_all = torch.cat([i for _, i, _ in answers])
            ranges = [r for _, _, r in answers]
        _, picked = top_k(keys_all, index_all, ctx.k)
        return Selection(
            [int(i) for i in picked],
            {"select_seconds": time.perf_counter() - start},
            score_range=merge_ranges(ranges),
        )

    return select


def random_plan(x: PlanInputs) -> Plan:
    """The driver's unlabeled positions and their draw (`random_select`)."""
    n = sum(x.shard_free)
    return Plan(
        (
            Item(
                "driver",
                "ram",
                "unlabeled positions and their draw",
                n * 16,
                f"unlabeled x 16 B = {n} x 16 B",
                fix="use a smaller pool",
            ),
        ),
        len(x.shard_free),
        x.local,
    )


def score_plan(x: PlanInputs) -> Plan | None:
    """Each shard's scores of its unlabeled members and their sort (`top_scores`); BALD's MC draws
    of a block; softrank's gathered (score, index) on the driver."""
    free, C = max(x.shard_free), x.n_classes
    items = [
        Item(
            "shard",
            "ram",
            "unlabeled members' probabilities, scores and their sort",
            free * (4 * C + 36),
            f"unlabeled x (C x 4 + 36) B = {free} x ({C} x 4 + 36) B",
            ("select",),
            "use more --shards",
        )
    ]
    items += mc_items(x, "gpu" if x.shard_gpu else "ram") if x.cfg.name == "bald" else []
    if x.cfg.stochastic == "softrank":
        n = sum(x.shard_free)
        items.append(Item("driver", "ram", "softrank's (score, index) of every candidate", n * 16, f"{n} x 16 B"))
    return Plan(tuple(items), len(x.shard_free), x.local)


register(
    "random",
    Strategy(
        random_select, needs_model=False, doc="uniform over the unlabeled pool", cold_start=True, plan=random_plan
    ),
)
for _name in SCORES:
    register(
        _name,
        Strategy(
            _score_strategy(_name), doc=f"highest {_name} score (--stochastic: drawn)", plan=score_plan, stochastic=True
        ),
    )
register(
    "bald",
    Strategy(
        _score_strategy("bald"),
        doc="highest mutual information of MC-dropout draws (--stochastic: drawn; BALD: Houlsby et al. 2011, "
        "arXiv 1112.5745; Gal et al. 2017, arXiv 1703.02910)",
        plan=score_plan,
        stochastic=True,
        own_options=("mc_samples", "mc_dropout"),
    ),
)
