"""`fm-ray run --dry-run`: the run's memory plan, from the config, the pool's size and the model,
without starting Ray or training anything."""

from __future__ import annotations

import numpy as np
import torch

from fm_ray.config import RunConfig, initial_size, resolve_backend
from fm_ray.core.memory import human
from fm_ray.data.registry import open_source
from fm_ray.data.settings import initial_labeled, sample_pool
from fm_ray.errors import UserError
from fm_ray.model.train import resolve_device
from fm_ray.model.zoo import build_model
from fm_ray.run.validate import check, planned_rounds
from fm_ray.strategies.memory import check_plan, pixels_of, plan_inputs, query_plan


def dry_run(cfg: RunConfig) -> str:
    """The plan of the run's largest query, as text; a UserError (after printing nothing) when it
    does not fit. The largest query: the first round's (the most candidates) or the last one's
    (the most labeled rows), whichever needs more."""
    check(cfg)
    data = open_source(cfg.data)
    pool = sample_pool(cfg.data, data, cfg.seed)
    T, C = len(pool.train_index), len(pool.classes)
    (channels, _, side) = data.train.images.shape
    model = build_model(cfg.model.__class__(cfg.model.name), channels, side, C)
    device = resolve_device(cfg.train.device)
    shard_gpu = (cfg.pool.gpus_per_shard or 0) > 0 or (cfg.pool.gpus_per_shard is None and torch.cuda.is_available())
    local = resolve_backend(cfg.pool) == "local"
    if local:
        shard_gpu = device.type == "cuda"
    shard_device = "cuda" if shard_gpu else "cpu"
    init = initial_size(cfg)
    first = initial_labeled(T, min(init, T), cfg.seed)
    n_last = min(T - cfg.batch, init + cfg.batch * max(0, planned_rounds(cfg, T) - 1), cfg.budget or T)
    last = np.arange(max(n_last, len(first)))  # the count matters, not which (shards are near even)
    best = None
    for labeled in (first, last):
        x = plan_inputs(
            model,
            C,
            T,
            cfg.pool.shards,
            labeled,
            cfg.batch,
            cfg.strategy,
            shard_device,
            local,
            device,
            pixels=pixels_of(data.train.images),  # its shape and kind: no pixel is read
        )
        plan = query_plan(x)
        if plan is None:
            return f"{cfg.strategy.name}: no memory plan"
        total = plan.peak("driver", "ram") + plan.peak("shard", "ram") + plan.peak("driver", "gpu")
        if best is None or total > best[0]:
            best = (total, plan, x)
    assert best is not None
    _, plan, x = best
    text = f"memory plan of the largest query ({cfg.strategy.name}, {T} pool samples on {len(x.shard_members)} "
    text += f"shard(s), {x.n_labeled} labeled, K = {cfg.batch}):\n"
    process, memory, peak = plan.largest_process()
    text += (
        plan.text() + f"\nlargest process: the {process}, {human(peak)} of {'GPU memory' if memory == 'gpu' else 'RAM'}"
    )
    try:
        check_plan(plan, x, device)
    except UserError as e:
        raise UserError(f"{text}\n{e}") from None
    return text + "\nfits: in the RAM free on this machine (and the GPUs this process sees)"
