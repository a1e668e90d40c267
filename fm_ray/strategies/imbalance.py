"""GALAXY (Zhang et al. 2022), the imbalance-aware baseline: graph bisection per class, on the model's
probabilities (gathered to the driver: C numbers a sample) and the labels of the labeled set only."""

from __future__ import annotations

import time

import numpy as np
import torch

from fm_ray.core.galaxy import UNLABELED, galaxy_select
from fm_ray.core.memory import Item, Plan
from fm_ray.core.random import hash_uniform
from fm_ray.errors import UserError
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import member_probs
from fm_ray.strategies import PlanInputs, QueryContext, Selection, Strategy, by_position, register, spread_range


def galaxy_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    if ctx.labels is None:
        raise UserError("galaxy needs the classes of the labeled samples (model outputs 0..C-1): pass them as labels")
    start = time.perf_counter()
    probs_N_C = by_position(pool.map(member_probs), ctx.pool_size)
    n_classes = probs_N_C.shape[1]
    if ((ctx.labels < UNLABELED) | (ctx.labels >= n_classes)).any():
        raise UserError(f"galaxy: the labeled samples' classes must be model outputs 0..{n_classes - 1}")
    labels_N = np.full(ctx.pool_size, UNLABELED, dtype=np.int64)
    # a label not known yet (-1: sent out for labeling, not back) counts as the predicted class, as picks do
    predicted = probs_N_C[torch.from_numpy(ctx.labeled)].argmax(1).numpy()
    labels_N[ctx.labeled] = np.where(ctx.labels >= 0, ctx.labels, predicted)
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    classes_k = np.random.default_rng([ctx.seed, 4, ctx.round]).integers(n_classes, size=ctx.k)
    tiebreak_N = hash_uniform(ctx.seed, ctx.round, torch.arange(ctx.pool_size))
    picks = galaxy_select(probs_N_C, labels_N, ctx.k, classes_k, tiebreak_N)
    timings = {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start}
    return Selection(picks, timings, score_range=spread_range(probs_N_C[torch.from_numpy(labels_N == UNLABELED)]))


def galaxy_plan(x: PlanInputs) -> Plan:
    """The driver's probabilities and one chain (sorted positions) per class."""
    n, c = sum(x.shard_members), x.n_classes
    fix = "use a smaller pool: galaxy gathers every sample's probabilities to the driver"
    items = (
        Item("driver", "ram", "pool probabilities", n * c * 4, f"N x C x 4 B = {n} x {c} x 4", fix=fix),
        Item("driver", "ram", "class chains", n * c * 16, f"N x C x 16 B (margins, order) = {n} x {c} x 16", fix=fix),
    )
    return Plan(items, len(x.shard_members), x.local)


register(
    "galaxy",
    Strategy(
        galaxy_strategy,
        doc="graph bisection per class for imbalanced pools (Zhang et al. 2022, arXiv 2202.01402; as LabelBench)",
        plan=galaxy_plan,
    ),
)
