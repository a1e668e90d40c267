"""BatchBALD (Kirsch et al. 2019, arXiv 1906.08158) over MC-dropout draws made on the shards.

Each shard keeps its members' draws (``BatchBALDState``); the driver keeps the picks' joint
(``core.bayes.JointBuilder``) and sends it every step; each shard answers its best candidate, as
FisherMask's greedy does.
"""

from __future__ import annotations

import time

import torch

from fm_ray._internal.log import progress
from fm_ray.core.bayes import BatchBALDState, batchbald_greedy, chunk_rows, mc_seed
from fm_ray.core.memory import Item, Plan
from fm_ray.pool import ShardedPool, state_call
from fm_ray.pool.shard import PoolShard, first_score_range
from fm_ray.strategies import PlanInputs, QueryContext, Selection, Strategy, merge_ranges, register
from fm_ray.strategies.mc import FIX_MC, MCDropout, mc_blocks, mc_items

_JOINT_TAG = 0xBB  # mc_seed's tag for the sampled labelings
FIX_JOINT = "lower --batchbald-samples (the joint is then estimated from fewer labelings)"


def build_batchbald(shard: PoolShard, mc: MCDropout) -> None:
    """Every member's MC draws (float32, on the shard's device) and its candidates, as the state."""
    N, C = len(shard.index_N), shard.spec.n_classes
    log_probs_N_T_C = torch.empty(N, mc.samples, C, dtype=torch.float32, device=shard.device)
    for pos, lp_b_T_C in mc_blocks(shard, mc):
        log_probs_N_T_C[pos.to(shard.device)] = lp_b_T_C.float()
    shard.state = BatchBALDState(log_probs_N_T_C, shard.index_N, ~shard.labeled_N)


def batchbald_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    pool.map(build_batchbald, MCDropout.of(ctx))
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    seed = mc_seed(ctx.seed, ctx.round, _JOINT_TAG)
    call = state_call(pool, BatchBALDState)
    picks = batchbald_greedy(call, ctx.k, num_samples=ctx.cfg.batchbald_samples, seed=seed, progress=progress)
    timings = {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start}
    return Selection(picks, timings, score_range=merge_ranges(pool.map(first_score_range)))


def batchbald_plan(x: PlanInputs) -> Plan:
    """Each shard's draws and score chunk; the driver's joint, and the copies of it sent each step."""
    cfg, C = x.cfg, x.n_classes
    T, members = cfg.mc_samples, max(x.shard_members)
    M = min(cfg.batchbald_samples, C ** max(0, x.k - 1))  # most labelings of the picks the joint holds
    rows = chunk_rows(M, C)
    sh = "gpu" if x.shard_gpu else "ram"
    items = [
        *mc_items(x, sh),
        Item(
            "shard",
            sh,
            "MC log-probabilities of every member",
            members * (T * C * 4 + 8 + 2),
            f"members x (T x C x 4 + 10) B = {members} x ({T} x {C} x 4 + 10) B",
            ("init", "select"),
            FIX_MC,
        ),
        Item(
            "shard",
            sh,
            "joint of the picks, as sent",
            M * (T + 1) * 8,
            f"M x (T + 1) x 8 B = {M} x {T + 1} x 8 B",
            ("select",),
            FIX_JOINT,
        ),  # fmt: skip
        Item(
            "shard",
            sh,
            "score chunk",
            2 * rows * M * C * 8,
            f"2 x rows x M x C x 8 B = 2 x {rows} x {M} x {C} x 8 B",
            ("select",),
            FIX_JOINT,
        ),
        Item(
            "driver",
            "ram",
            "joint of the picks",
            3 * M * T * 8,
            f"3 x M x T x 8 B = 3 x {M} x {T} x 8 B",
            ("select",),
            FIX_JOINT,
        ),  # fmt: skip
    ]
    if not x.local:  # a shard restarted mid-round is replayed every message of the round (pool.ray_pool)
        items.append(
            Item(
                "driver",
                "ram",
                "messages kept for a replay",
                x.k * M * (T + 1) * 8,
                f"K x M x (T + 1) x 8 B = {x.k} x {M} x {T + 1} x 8 B",
                ("select",),
                FIX_JOINT,
            )  # fmt: skip
        )
    return Plan(tuple(items), len(x.shard_members), x.local)


register(
    "batchbald",
    Strategy(
        batchbald_strategy,
        doc="greedy joint mutual information of MC-dropout draws (BatchBALD: Kirsch et al. 2019, arXiv 1906.08158)",
        plan=batchbald_plan,
        own_options=("mc_samples", "mc_dropout", "batchbald_samples"),
    ),
)
