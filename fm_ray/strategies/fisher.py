"""FisherMask (Gul et al., arXiv 2411.05752) and BAIT (Ash et al., NeurIPS 2021).

Both run the same greedy Woodbury selection on Fisher embeddings; they differ in the weights the
embeddings cover: FisherMask keeps the top `sparsity` fraction of all weights by Fisher value,
BAIT the final layer.

Device placement: each shard computes and keeps its Fisher embeddings, their partial sums and the
greedy state on its own device; the driver keeps ``M^-1`` and ``F`` on its training device (the
model's); per step only the factors documented in core.greedy cross between them.
"""

from __future__ import annotations

import time

import torch

from fm_ray._internal.log import log, progress
from fm_ray.core import fisher
from fm_ray.core import mask as fmask
from fm_ray.core.greedy import GreedyState, greedy_select
from fm_ray.pool import ShardedPool, state_call
from fm_ray.pool.shard import BLOCK, DTYPES, PoolShard, first_score_range, read_only
from fm_ray.strategies import QueryContext, Selection, Strategy, merge_ranges, register


@read_only
def fisher_diag_partial(shard: PoolShard, n_first: int, chunk_size: int, dtype: str) -> tuple[torch.Tensor, int]:
    """Partial float64 Fisher-diagonal sum over this shard's members among the first `n_first`
    pool positions, and their count, for the driver to add up."""
    rows = torch.nonzero(shard.index_N < n_first).flatten()
    model, dt = shard.model_in(DTYPES[dtype]), DTYPES[dtype]
    n_params = sum(p.numel() for p in shard.model.parameters())
    total = torch.zeros(n_params, dtype=torch.float64, device=shard.device)
    for chunk in rows.split(BLOCK):
        total += fisher.fisher_diag_sum(model, shard.inputs(chunk, dt), chunk_size=chunk_size)
    return total, len(rows)


def build_greedy_state(
    shard: PoolShard, mask_idx: torch.Tensor | None, method: str, chunk_size: int, dtype: str, embed_dtype: str
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fisher embeddings of every member (`mask_idx` None: last layer, i.e. BAIT), computed in
    `dtype`; keeps the unlabeled ones as greedy candidates, stored in `embed_dtype` ("float32":
    as computed), and returns partial float64 (pool sum, labeled sum, count) of V^T V.

    Block by block on the shard's device: the sums use the embeddings as computed, and only the
    candidates' stored copy is ever pool-sized (no float64 or second full-precision copy)."""
    dt = DTYPES[dtype]
    store = dt if embed_dtype == "float32" else DTYPES[embed_dtype]
    C, device = shard.spec.n_classes, shard.device
    if mask_idx is None:
        probs, feats = shard.predictions()
        D = C * feats.shape[1]
    else:
        model, mask_idx = shard.model_in(dt), mask_idx.to(device)
        D = mask_idx.numel()
    free_N = ~shard.labeled_N
    emb_S_C_D = torch.empty(int(free_N.sum()), C, D, dtype=store, device=device)
    pool_sum = torch.zeros(D, D, dtype=torch.float64, device=device)
    labeled_sum = torch.zeros(D, D, dtype=torch.float64, device=device)
    stored = 0
    blocks = shard.blocks()
    for rows in progress(blocks, "Fisher embeddings", total=len(blocks), unit="block"):
        if mask_idx is None:
            block = fisher.last_layer_embeddings(probs[rows].to(device, dt), feats[rows].to(device, dt))
        else:
            block = fisher.fisher_embeddings(model, shard.inputs(rows, dt), mask_idx, chunk_size=chunk_size)
        free = free_N[rows].to(device)
        b64 = block.double()
        flat, lab = b64.reshape(-1, D), b64[~free].reshape(-1, D)
        pool_sum += flat.T @ flat
        labeled_sum += lab.T @ lab
        candidates = block[free]
        emb_S_C_D[stored : stored + len(candidates)] = candidates.to(store)
        stored += len(candidates)
    shard.state = GreedyState(emb_S_C_D, shard.index_N[free_N], method=method)  # type: ignore[arg-type]
    return pool_sum, labeled_sum, len(shard.index_N)


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    """Shards' partial sums added in shard order."""
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total


def _fisher_mask(pool: ShardedPool, ctx: QueryContext) -> tuple[torch.Tensor, dict]:
    cfg = ctx.cfg
    n = ctx.pool_size if cfg.fisher_samples is None else min(cfg.fisher_samples, ctx.pool_size)
    parts = pool.map(fisher_diag_partial, n, cfg.chunk_size, cfg.fisher_dtype)  # the reference uses the first n
    diag_P = _total([p.cpu() for p, _ in parts]) / sum(c for _, c in parts)
    n_params = diag_P.numel()
    always = fmask.final_layer_indices(ctx.model) if cfg.include_last_layer else None
    mask_idx = fmask.fisher_mask(diag_P, fmask.mask_size(n_params, cfg.sparsity), always_include=always)
    profile = fmask.mask_profile(mask_idx, fisher.param_layout(ctx.model))
    return mask_idx, {"mask_size": int(mask_idx.numel()), "mask_profile": profile}


def _greedy(pool: ShardedPool, ctx: QueryContext, mask_idx: torch.Tensor | None) -> tuple[list[int], dict[str, float]]:
    cfg = ctx.cfg
    driver = next(ctx.model.parameters()).device  # M^-1 and F live where the driver trains
    start = time.perf_counter()
    parts = pool.map(build_greedy_state, mask_idx, cfg.greedy, cfg.chunk_size, cfg.fisher_dtype, cfg.embed_dtype)
    reduce_start = time.perf_counter()
    fisher_D_D = _total([p.to(driver) for p, _, _ in parts]) / sum(n for _, _, n in parts)
    labeled_sum = _total([s.to(driver) for _, s, _ in parts]) if cfg.labeled_init else None
    embed_s, reduce_s = time.perf_counter() - start, time.perf_counter() - reduce_start
    d = fisher_D_D.shape[0]
    log(f"  Fisher embeddings (d = {d}) and partial sums on {len(parts)} shard(s): {embed_s:.1f}s; selecting {ctx.k}")
    start = time.perf_counter()
    picks = greedy_select(
        state_call(pool, GreedyState),
        fisher_D_D,
        ctx.k,
        n_labeled=len(ctx.labeled),
        labeled_sum_D_D=labeled_sum,
        lam=cfg.lam,
        backward_steps=cfg.backward_steps,
        progress=progress,
    )
    timings = {"embed_seconds": embed_s, "reduce_seconds": reduce_s, "select_seconds": time.perf_counter() - start}
    return picks, timings


def fishermask_select(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    mask_idx, info = _fisher_mask(pool, ctx)
    mask_s = time.perf_counter() - start
    log(f"  Fisher mask: {info['mask_size']} weights ({ctx.cfg.sparsity:g} of all) in {mask_s:.1f}s")
    picks, timings = _greedy(pool, ctx, mask_idx)
    ranged = merge_ranges(pool.map(first_score_range))
    return Selection(picks, {"mask_seconds": mask_s, **timings}, info, score_range=ranged)


def bait_select(pool: ShardedPool, ctx: QueryContext) -> Selection:
    picks, timings = _greedy(pool, ctx, None)
    return Selection(picks, timings, score_range=merge_ranges(pool.map(first_score_range)))


register(
    "fishermask",
    Strategy(fishermask_select, doc="greedy Fisher selection on the top-k Fisher weights"),
)
register("bait", Strategy(bait_select, doc="greedy Fisher selection on the final layer"))
