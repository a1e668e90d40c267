"""k-center greedy (Coreset; Sener & Savarese, ICLR 2018) and BADGE (Ash et al., ICLR 2020)."""

from __future__ import annotations

import time

import torch

from fm_ray._internal.log import progress
from fm_ray.core import badge, kcenter
from fm_ray.core.badge import KMeansPPState, badge_select, gradient_factor
from fm_ray.core.kcenter import KCenterState, kcenter_select
from fm_ray.core.memory import Item, Plan
from fm_ray.pool import ShardedPool, state_call
from fm_ray.pool.shard import BLOCK, PoolShard, first_score_range, read_only
from fm_ray.strategies import PlanInputs, QueryContext, Selection, Strategy, merge_ranges, register
from fm_ray.strategies.subsets import candidates

_FIX = "use more --shards, or --candidates N (the state then covers N samples, not the shard)"
_FIX_L = "label fewer samples (--budget)"


@read_only
def labeled_feats(shard: PoolShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features of this shard's labeled members, with their global indices."""
    _, feats = shard.predictions()
    return feats[shard.labeled_N], shard.index_N[shard.labeled_N]


def _rows(shard: PoolShard, chosen: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The rows a diversity state holds (None: every member, the cached predictions as they are,
    no copy) and which of them it may pick (the unlabeled ones); with `--candidates`, the
    candidates' rows alone (a copy, bounded by N), every one eligible."""
    free = ~shard.labeled_N
    if chosen is None:
        return None, free
    rows = torch.nonzero(free & torch.isin(shard.index_N, chosen)).flatten()
    return rows, torch.ones(len(rows), dtype=torch.bool)


def build_kcenter(shard: PoolShard, chosen: torch.Tensor | None) -> None:
    """k-center's state over the cached features (every member, the unlabeled ones eligible), or
    over the candidates' rows alone."""
    _, feats = shard.predictions()
    rows, eligible = _rows(shard, chosen)
    index = shard.index_N if rows is None else shard.index_N[rows]
    shard.state = KCenterState((feats if rows is None else feats[rows]).to(shard.device), index, eligible)


def build_badge(shard: PoolShard, chosen: torch.Tensor | None) -> None:
    """BADGE's gradient embeddings as Kronecker factors: ``g`` (C numbers a row, made block by
    block) and ``h``, the cached features themselves; never the C x E embedding."""
    probs, feats = shard.predictions()
    rows, eligible = _rows(shard, chosen)
    if rows is not None:
        probs, feats = probs[rows], feats[rows]
    g_N_C = torch.empty(probs.shape, dtype=probs.dtype, device=shard.device)
    for lo in range(0, len(probs), BLOCK):  # the one-hot's int64 temporaries: one block at a time
        g_N_C[lo : lo + BLOCK] = gradient_factor(probs[lo : lo + BLOCK].to(shard.device))
    index = shard.index_N if rows is None else shard.index_N[rows]
    shard.state = KMeansPPState(g_N_C, feats.to(shard.device, probs.dtype), index, eligible)


def kcenter_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    labeled = pool.map(labeled_feats)
    feats_L_E = torch.cat([f for f, _ in labeled])
    pool.map(build_kcenter, candidates(pool, ctx, ctx.k))
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    picks = kcenter_select(state_call(pool, KCenterState), ctx.k, feats_L_E, progress)
    timings = {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start}
    return Selection(picks, timings, score_range=merge_ranges(pool.map(first_score_range)))


def badge_strategy(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    pool.map(build_badge, candidates(pool, ctx, ctx.k))
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    picks = badge_select(state_call(pool, KMeansPPState), ctx.k, ctx.seed * 100_003 + ctx.round, progress)
    timings = {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start}
    return Selection(picks, timings, score_range=merge_ranges(pool.map(first_score_range)))


def _state_rows(x: PlanInputs) -> tuple[int, bool]:
    """Rows of the largest shard's state, and whether they are a copy: every member (the cached
    predictions as they are), or its share of `--candidates` (at most N, copied)."""
    members, cfg = max(x.shard_members), x.cfg
    if cfg.candidates is None or cfg.candidates >= sum(x.shard_free):
        return members, False
    return min(max(x.shard_free), cfg.candidates), True


def _state_items(x: PlanInputs, what: str, per_row: int, per_row_text: str, block: int, block_text: str) -> list[Item]:
    """A diversity state of `per_row` bytes a row, its rows' features (copied for candidates, and
    onto a GPU), and one block's temporaries, on the largest shard."""
    R, copy = _state_rows(x)
    E, sh = x.feat_dim, "gpu" if x.shard_gpu else "ram"
    per_row += 8 if copy else 0  # the candidates' global indices (else the shard's own)
    items = [
        Item("shard", sh, what, R * per_row, f"rows x {per_row} B = {R} x ({per_row_text}) B", fix=_FIX),
        Item("shard", sh, "a step's block temporaries", block, block_text, ("init", "select"), "its size is fixed"),
    ]
    if copy or x.shard_gpu:
        items.append(
            Item("shard", sh, "the rows' features (a copy)", R * E * 4, f"rows x E x 4 B = {R} x {E} x 4 B", fix=_FIX)
        )
    return items


def kcenter_plan(x: PlanInputs) -> Plan:
    """k-center's distances and flags, the labeled set's features, and one block's differences."""
    E, nL = x.feat_dim, x.n_labeled
    R, _ = _state_rows(x)
    rows, diffs = min(R, kcenter.block_rows(E)), min(kcenter._CHUNK_ELEMS, R * max(nL, 1) * E)
    items = _state_items(
        x,
        "k-center state (distances, chosen and eligible flags)",
        4 + 2,
        "4 + 2",
        diffs * 4 + rows * 32,
        f"{diffs} differences x 4 B + {rows} rows x 32 B",
    )
    items += [
        Item("shard", "ram", "labeled set's features", nL * E * 4, f"n_L x E x 4 B = {nL} x {E} x 4 B", fix=_FIX_L),
        Item("driver", "ram", "labeled set's features, gathered", 2 * nL * E * 4, f"2 x {nL} x {E} x 4 B", fix=_FIX_L),
    ]
    return Plan(tuple(items), len(x.shard_free), x.local)


def badge_plan(x: PlanInputs) -> Plan:
    """BADGE's ``g`` (float32) and float64 norms and D^2, and one block of float64 factors."""
    C, E = x.n_classes, x.feat_dim
    rows = min(_state_rows(x)[0], badge.block_rows(C, E))
    block = rows * ((C + E) * 8 + max(C, E) * 8 + 96)
    items = _state_items(
        x,
        "BADGE state (g, |g|^2, |h|^2, D^2, flags)",
        4 * C + 3 * 8 + 2,
        f"{C} x 4 + 3 x 8 + 2",
        block,
        f"{rows} rows x ((C + E) x 8 + max(C, E) x 8 + 96) B",
    )
    return Plan(tuple(items), len(x.shard_free), x.local)


register("kcenter", Strategy(kcenter_strategy, doc="k-center greedy on penultimate features", plan=kcenter_plan))
register(
    "badge",
    Strategy(badge_strategy, doc="k-means++ seeding on last-layer gradient embeddings", plan=badge_plan),
)
