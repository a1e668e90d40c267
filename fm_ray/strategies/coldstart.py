"""Cold-start selectors: TypiClust (Hacohen et al., ICML 2022) and ProbCover (Yehuda et al., NeurIPS 2022).

They need no labels (an `--init-strategy`), only the penultimate features of the pool, which the
shards compute and the driver gathers (E numbers a sample: cold-start pools are small); the math is
in fm_ray/core/coldstart.py.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from fm_ray.config import ModelConfig
from fm_ray.core.coldstart import BLOCK as COLD_BLOCK
from fm_ray.core.coldstart import probcover_select, typiclust_select
from fm_ray.core.memory import Item, Plan
from fm_ray.core.random import hash_uniform
from fm_ray.errors import UserError
from fm_ray.model.train import predict
from fm_ray.model.zoo import build_model, features_model
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import BLOCK, PoolShard, ShardSpec, read_only
from fm_ray.strategies import PlanInputs, QueryContext, Selection, Strategy, by_position, register, spread_range


@read_only
def member_feats(shard: PoolShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's global position and penultimate features."""
    _, feats = shard.predictions()
    return shard.index_N, feats


@read_only
def shard_spec(shard: PoolShard) -> ShardSpec:
    return shard.spec


@read_only
def frozen_feats(
    shard: PoolShard, model_cfg: ModelConfig, weights: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member's global position and penultimate features under a frozen model (--features)."""
    spec = shard.spec
    model = build_model(
        dataclasses.replace(model_cfg, pretrained=False, checkpoint=None), spec.channels, spec.side, spec.n_classes
    )
    model.load_state_dict(weights)
    blocks = [x_u8 for _, x_u8 in shard.stream()] or [torch.zeros(1, *shard.images.shape, dtype=torch.uint8)]
    feats = torch.cat([predict(model, x_u8, spec.norm, shard.device, batch=BLOCK)[1] for x_u8 in blocks])
    return shard.index_N, feats[: len(shard.index_N)]


def _frozen(pool: ShardedPool, features: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """--features: the frozen model built here, where its weights are (ImageNet's cache, the checkpoint
    file), and sent to the shards, which never read them."""
    spec = pool.map(shard_spec)[0]
    if spec.model is None:
        raise UserError("--features needs an fm_ray model (--model), not a module of your own: pass embed= instead")
    cfg = features_model(features, spec.model)
    model = build_model(cfg, spec.channels, spec.side, spec.n_classes)
    return pool.map(frozen_feats, cfg, {n: t.detach().cpu() for n, t in model.state_dict().items()})


def pool_feats(pool: ShardedPool, ctx: QueryContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole pool's features by pool position (the trained model's, or --features'), and which
    positions are labeled."""
    answers = pool.map(member_feats) if ctx.cfg.features is None else _frozen(pool, ctx.cfg.features)
    feats_N_E = by_position(answers, ctx.pool_size)
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
        timings = {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start}
        return Selection(picks, timings, score_range=spread_range(feats_N_E[~labeled_N]))

    return select


def _typiclust(feats_N_E: torch.Tensor, labeled_N: torch.Tensor, ctx: QueryContext) -> list[int]:
    return typiclust_select(feats_N_E, labeled_N, ctx.k, seed=ctx.seed * 100_003 + ctx.round)


def _probcover(feats_N_E: torch.Tensor, labeled_N: torch.Tensor, ctx: QueryContext) -> list[int]:
    tiebreak_N = hash_uniform(ctx.seed, ctx.round, torch.arange(ctx.pool_size))
    return probcover_select(feats_N_E, labeled_N, ctx.k, ctx.cfg.probcover_delta, tiebreak_N)


_FIX = "use a smaller pool: the cold-start selectors gather every sample's features to the driver"


def coldstart_plan(x: PlanInputs) -> Plan:
    """The driver's features (float64) and one block of distances (ProbCover's edges depend on the
    data: not counted)."""
    n, e = sum(x.shard_members), x.feat_dim
    items = (
        Item("driver", "ram", "pool features", n * e * 8, f"N x E x 8 B = {n} x {e} x 8", fix=_FIX),
        Item("driver", "ram", "distance block", min(COLD_BLOCK, n) * n * 8, f"{COLD_BLOCK} x N x 8 B", fix=_FIX),
    )
    return Plan(items, len(x.shard_members), x.local)


register(
    "typiclust",
    Strategy(
        _timed(_typiclust),
        doc="most typical sample of the least-labeled k-means clusters (Hacohen et al. 2022, arXiv 2202.02794)",
        plan=coldstart_plan,
        cold_start=True,
    ),
)
register(
    "probcover",
    Strategy(
        _timed(_probcover),
        doc="greedy max coverage of delta-balls on normalized features (Yehuda et al. 2022, arXiv 2205.11320)",
        plan=coldstart_plan,
        cold_start=True,
        own_options=("probcover_delta",),
    ),
)
