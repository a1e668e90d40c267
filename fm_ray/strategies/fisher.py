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
from dataclasses import dataclass

import torch

from fm_ray._internal.log import log, progress
from fm_ray.core import fisher
from fm_ray.core import mask as fmask
from fm_ray.core.approx import projection, projection_seed, top_class_rows
from fm_ray.core.greedy import GreedyState, greedy_select, initial_inverse
from fm_ray.core.memory import GreedySizes, Plan, fisher_workspace, greedy_plan
from fm_ray.pool import ShardedPool, state_call
from fm_ray.pool.shard import BLOCK, DTYPES, PoolShard, first_score_range, read_only
from fm_ray.strategies import PlanInputs, QueryContext, Selection, Strategy, merge_ranges, register
from fm_ray.strategies.memory import head_shape
from fm_ray.strategies.subsets import candidates, subset


@read_only
def fisher_diag_partial(shard: PoolShard, n_first: int, chunk_size: int, dtype: str) -> tuple[torch.Tensor, int]:
    """Partial float64 Fisher-diagonal sum over this shard's members among the first `n_first`
    pool positions, and their count, for the driver to add up."""
    rows = torch.nonzero(shard.index_N < n_first).flatten()
    model, dt = shard.model_in(DTYPES[dtype]), DTYPES[dtype]
    n_params = sum(p.numel() for p in shard.model.parameters())
    total = torch.zeros(n_params, dtype=torch.float64, device=shard.device)
    for _, x_u8 in shard.stream(list(rows.split(BLOCK))):
        total += fisher.fisher_diag_sum(model, shard.normalized(x_u8, dt), chunk_size=chunk_size)
    return total, len(rows)


@dataclass(frozen=True)
class Approx:
    """The opt-in approximations a shard applies to its Fisher embeddings (core.approx); the
    defaults are exact. ``candidates``: the global pool positions kept as greedy candidates (None:
    every unlabeled member); ``top_classes``: rows kept per sample; ``project``: (r, seed);
    ``fisher_pool``: the global pool positions whose embeddings make up F (None: every member)."""

    candidates: torch.Tensor | None = None
    top_classes: int | None = None
    project: tuple[int, int] | None = None
    fisher_pool: torch.Tensor | None = None

    def projection_matrix(self, D: int, dtype: torch.dtype) -> torch.Tensor:
        assert self.project is not None
        r, seed = self.project
        return projection(D, r, seed, dtype)


def build_greedy_state(
    shard: PoolShard,
    mask_idx: torch.Tensor | None,
    method: str,
    chunk_size: int,
    dtype: str,
    embed_dtype: str,
    labeled_rows: bool = False,
    approx: Approx = Approx(),
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Fisher embeddings of the members (`mask_idx` None: last layer, i.e. BAIT), computed in
    `dtype`; keeps the unlabeled ones as greedy candidates, stored in `embed_dtype` ("float32":
    as computed), and returns partial float64 (pool sum, labeled sum, count) of V^T V. With
    `labeled_rows`, the labeled members' embeddings are kept in the state instead of their sum
    (the driver then builds M_0^-1 by Woodbury; the labeled sum is None).

    Exact by default: every member's embeddings, all of them in the pool sum. With
    `approx.fisher_pool` the pool sum covers that sample alone, and embeddings are computed only
    for the members something uses (the sample, the candidates, the labeled set): with
    `--candidates` too, a round's backward work no longer grows with the pool.

    Block by block on the shard's device, the pixels streamed (`PoolShard.stream`): the sums use
    the embeddings as computed (after any `approx`), and only the candidates' stored copy is ever
    pool-sized (no float64 or second full-precision copy); the sums grow in place."""
    dt = DTYPES[dtype]
    store = dt if embed_dtype == "float32" else DTYPES[embed_dtype]
    C, device = shard.spec.n_classes, shard.device
    probs, feats = shard.predictions()
    if mask_idx is None:
        D = C * feats.shape[1]
    else:
        model, mask_idx = shard.model_in(dt), mask_idx.to(device)
        D = mask_idx.numel()
    rows = min(C, approx.top_classes or C)
    R_D_r = None if approx.project is None else approx.projection_matrix(D, dt).to(device)
    width = D if R_D_r is None else R_D_r.shape[1]
    free_N = ~shard.labeled_N
    keep_N = free_N if approx.candidates is None else free_N & torch.isin(shard.index_N, approx.candidates)
    in_F_N = torch.ones_like(free_N) if approx.fisher_pool is None else torch.isin(shard.index_N, approx.fisher_pool)
    used_N = in_F_N | keep_N | ~free_N
    emb_S_C_D = torch.empty(int(keep_N.sum()), rows, width, dtype=store, device=device)
    pool_sum = torch.zeros(width, width, dtype=torch.float64, device=device)
    labeled_sum = None if labeled_rows else torch.zeros(width, width, dtype=torch.float64, device=device)
    labeled: list[torch.Tensor] = []
    stored = 0
    blocks = [b[used_N[b]] for b in shard.blocks() if used_N[b].any()]  # the same sub-blocks on any shard count
    if mask_idx is None:  # closed form from the predictions: no pixels needed
        passes = (
            (pos, fisher.last_layer_embeddings(probs[pos].to(device, dt), feats[pos].to(device, dt))) for pos in blocks
        )
    else:
        passes = (
            (pos, fisher.fisher_embeddings(model, shard.normalized(x_u8, dt), mask_idx, chunk_size=chunk_size))
            for pos, x_u8 in shard.stream(blocks)
        )
    for pos, block in progress(passes, "Fisher embeddings", total=len(blocks), unit="block"):
        if rows < C:
            block = top_class_rows(block, probs[pos], rows)
        if R_D_r is not None:
            block = block @ R_D_r
        free, keep, in_F = free_N[pos].to(device), keep_N[pos].to(device), in_F_N[pos].to(device)
        b64 = block[in_F].double()
        flat = b64.reshape(-1, width)
        pool_sum.addmm_(flat.T, flat)
        if labeled_sum is None:
            labeled.append(block[~free])
        else:
            lab = block[~free].double().reshape(-1, width)
            labeled_sum.addmm_(lab.T, lab)
        del b64, flat
        candidates = block[keep]
        emb_S_C_D[stored : stored + len(candidates)] = candidates.to(store)
        stored += len(candidates)
    state = GreedyState(emb_S_C_D, shard.index_N[keep_N], method=method)  # type: ignore[arg-type]
    state.labeled_emb_L_C_D = torch.cat(labeled) if labeled else None
    shard.state = state
    return pool_sum, labeled_sum, int(in_F_N.sum())


@read_only
def labeled_embeddings(shard: PoolShard) -> torch.Tensor:
    """The labeled members' embeddings a `build_greedy_state(..., labeled_rows=True)` kept, (n, c, d)."""
    state = shard.state
    assert isinstance(state, GreedyState) and state.labeled_emb_L_C_D is not None
    return state.labeled_emb_L_C_D


def _fisher_mask(pool: ShardedPool, ctx: QueryContext) -> tuple[torch.Tensor, dict]:
    cfg = ctx.cfg
    n = ctx.pool_size if cfg.fisher_samples is None else min(cfg.fisher_samples, ctx.pool_size)
    total_P, count = pool.map_sum(
        fisher_diag_partial, n, cfg.chunk_size, cfg.fisher_dtype
    )  # the first n, as the reference
    diag_P = total_P.cpu() / count
    n_params = diag_P.numel()
    always = fmask.final_layer_indices(ctx.model) if cfg.include_last_layer else None
    mask_idx = fmask.fisher_mask(diag_P, fmask.mask_size(n_params, cfg.sparsity), always_include=always)
    profile = fmask.mask_profile(mask_idx, fisher.param_layout(ctx.model))
    return mask_idx, {"mask_size": int(mask_idx.numel()), "mask_profile": profile}


def _approx(pool: ShardedPool, ctx: QueryContext) -> Approx:
    """The configured approximations for this round; the subsets chosen over all shards."""
    cfg = ctx.cfg
    chosen = candidates(pool, ctx, ctx.k * (1 + cfg.backward_steps))
    fisher_pool = subset(pool, ctx, "fisher_pool", cfg.fisher_pool)
    project = None if cfg.project is None else (cfg.project, projection_seed(ctx.seed, ctx.round))
    return Approx(chosen, cfg.top_classes, project, fisher_pool)


def _greedy(pool: ShardedPool, ctx: QueryContext, mask_idx: torch.Tensor | None) -> tuple[list[int], dict[str, float]]:
    cfg = ctx.cfg
    driver = next(ctx.model.parameters()).device  # M^-1 and F live where the driver trains
    start = time.perf_counter()
    approx = _approx(pool, ctx)
    C, E = head_shape(ctx.model)
    width = cfg.project or (mask_idx.numel() if mask_idx is not None else C * E)
    rows = min(C, cfg.top_classes or C)
    # M_0^-1 by Woodbury from the labeled rows while they are fewer than d (checked again below)
    woodbury = cfg.labeled_init and len(ctx.labeled) * rows < width
    args = (mask_idx, cfg.greedy, cfg.chunk_size, cfg.fisher_dtype, cfg.embed_dtype, woodbury, approx)
    pool_sum, labeled_sum, count = pool.map_sum(build_greedy_state, *args)
    reduce_start = time.perf_counter()
    fisher_D_D = pool_sum.to(driver).div_(count)  # in place when already on the driver's device
    del pool_sum
    d = fisher_D_D.shape[0]
    if woodbury:
        rows_L = torch.cat([e.reshape(-1, d) for e in pool.map(labeled_embeddings)]).to(driver)
        inverse = initial_inverse(d, cfg.lam, len(ctx.labeled) + ctx.k, labeled_emb_R_D=rows_L, like=fisher_D_D)
        del rows_L
    else:
        lab = labeled_sum.to(driver) if cfg.labeled_init and labeled_sum is not None else None
        labeled_sum = None  # folded into M_0 and freed there
        inverse = initial_inverse(d, cfg.lam, len(ctx.labeled) + ctx.k, labeled_sum_D_D=lab, like=fisher_D_D)
        del lab
    embed_s, reduce_s = time.perf_counter() - start, time.perf_counter() - reduce_start
    log(
        f"  Fisher embeddings (d = {d}) and partial sums on {pool.n_shards} shard(s): {embed_s:.1f}s; selecting {ctx.k}"
    )
    start = time.perf_counter()
    picks = greedy_select(
        state_call(pool, GreedyState),
        fisher_D_D,
        ctx.k,
        n_labeled=len(ctx.labeled),
        lam=cfg.lam,
        backward_steps=cfg.backward_steps,
        progress=progress,
        inverse_D_D=inverse,
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


def _plan(x: PlanInputs, d: int, autograd: bool = True) -> Plan:
    """The greedy selection's large items for embeddings of width `d` (core.memory)."""
    cfg = x.cfg
    store = DTYPES[cfg.fisher_dtype] if cfg.embed_dtype == "float32" else DTYPES[cfg.embed_dtype]
    compute = torch.promote_types(store, torch.float32)
    most_free = max(x.shard_free)
    sizes = GreedySizes(
        d=d,
        C=x.n_classes,
        shard_free=most_free if cfg.candidates is None else min(most_free, cfg.candidates),
        n_labeled=x.n_labeled,
        k=x.k,
        rows=min(x.n_classes, cfg.top_classes or x.n_classes),
        width=cfg.project or d,
        embed_bytes=store.itemsize,
        compute_bytes=compute.itemsize,
        labeled_init=cfg.labeled_init,
        method=cfg.greedy,
        shard_gpu=x.shard_gpu,
        driver_gpu=x.driver_gpu,
        workspace=fisher_workspace(cfg.chunk_size, x.n_classes, x.activations) if autograd else 0,
    )
    return greedy_plan(sizes, len(x.shard_free), x.local)


def fishermask_plan(x: PlanInputs) -> Plan:
    d = fmask.mask_size(x.n_params, x.cfg.sparsity)
    return _plan(x, max(d, x.n_classes * x.feat_dim) if x.cfg.include_last_layer else d)


def bait_plan(x: PlanInputs) -> Plan:
    return _plan(x, x.n_classes * x.feat_dim, autograd=False)  # closed-form embeddings


register(
    "fishermask",
    Strategy(fishermask_select, doc="greedy Fisher selection on the top-k Fisher weights", plan=fishermask_plan),
)
register("bait", Strategy(bait_select, doc="greedy Fisher selection on the final layer", plan=bait_plan))
