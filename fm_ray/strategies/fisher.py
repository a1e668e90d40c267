"""FisherMask (Gul et al., arXiv 2411.05752) and BAIT (Ash et al., NeurIPS 2021).

Both run the same greedy Woodbury selection on Fisher embeddings; they differ in the weights the
embeddings cover: FisherMask keeps the top `sparsity` fraction of all weights by Fisher value,
BAIT the final layer.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from fm_ray.core import mask as fmask
from fm_ray.core.fisher import param_layout
from fm_ray.core.greedy import greedy_select
from fm_ray.log import log
from fm_ray.pool import ShardedPool, state_call
from fm_ray.strategies import QueryContext, Selection, Strategy, register


def _fisher_mask(pool: ShardedPool, ctx: QueryContext) -> tuple[torch.Tensor, dict]:
    cfg = ctx.cfg
    n = ctx.pool_size if cfg.fisher_samples is None else min(cfg.fisher_samples, ctx.pool_size)
    positions = np.arange(n)  # the reference code uses the first pool samples
    parts = pool.map("fisher_diag_sum", positions, cfg.chunk_size, cfg.fisher_dtype)
    diag_P = sum(p for p, _ in parts) / sum(c for _, c in parts)
    n_params = diag_P.numel()
    always = fmask.final_layer_indices(ctx.model) if cfg.include_last_layer else None
    mask_idx = fmask.fisher_mask(diag_P, fmask.mask_size(n_params, cfg.sparsity), always_include=always)
    profile = fmask.mask_profile(mask_idx, param_layout(ctx.model))
    return mask_idx, {"mask_size": int(mask_idx.numel()), "mask_profile": profile}


def _greedy(pool: ShardedPool, ctx: QueryContext, mask_idx: torch.Tensor | None) -> tuple[list[int], dict[str, float]]:
    cfg = ctx.cfg
    start = time.perf_counter()
    parts = pool.map("build_greedy", mask_idx, cfg.greedy, cfg.chunk_size, cfg.fisher_dtype)
    fisher_D_D = sum(p for p, _, _ in parts) / sum(n for _, _, n in parts)
    labeled_sum = sum(s for _, s, _ in parts) if cfg.labeled_init else None
    embed_s = time.perf_counter() - start
    d = fisher_D_D.shape[0]
    log(f"  Fisher embeddings (d = {d}) and partial sums on {len(parts)} shard(s): {embed_s:.1f}s; selecting {ctx.k}")
    start = time.perf_counter()
    picks = greedy_select(
        state_call(pool),
        fisher_D_D,
        ctx.k,
        n_labeled=len(ctx.labeled),
        labeled_sum_D_D=labeled_sum,
        lam=cfg.lam,
        backward_steps=cfg.backward_steps,
    )
    return picks, {"embed_seconds": embed_s, "select_seconds": time.perf_counter() - start}


def fishermask_select(pool: ShardedPool, ctx: QueryContext) -> Selection:
    start = time.perf_counter()
    mask_idx, info = _fisher_mask(pool, ctx)
    mask_s = time.perf_counter() - start
    log(f"  Fisher mask: {info['mask_size']} weights ({ctx.cfg.sparsity:g} of all) in {mask_s:.1f}s")
    picks, timings = _greedy(pool, ctx, mask_idx)
    return Selection(picks, {"mask_seconds": mask_s, **timings}, info)


def bait_select(pool: ShardedPool, ctx: QueryContext) -> Selection:
    picks, timings = _greedy(pool, ctx, None)
    return Selection(picks, timings)


register(
    "fishermask",
    Strategy(fishermask_select, doc="greedy Fisher selection on the top-k Fisher weights"),
)
register("bait", Strategy(bait_select, doc="greedy Fisher selection on the final layer"))
