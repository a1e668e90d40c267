"""The active-learning recipe: set up -> rounds (train -> evaluate -> query) -> results per round.

`fm-ray run` and every Ray Tune trial call `run_experiment` with one `RunConfig`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fm_ray._internal.log import log
from fm_ray.config import RunConfig
from fm_ray.data.core import write_skipped_images
from fm_ray.data.normalize import Normalizer
from fm_ray.data.registry import check_outside, open_source
from fm_ray.data.settings import initial_labeled, sample_pool
from fm_ray.errors import UserError
from fm_ray.model.train import evaluate, fit_round, resolve_device
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import peak_memory_mb, peak_rss_mb, state_bytes
from fm_ray.run._faults import fault_point
from fm_ray.run.rundir import RunDir, run_id
from fm_ray.run.validate import check, planned_rounds
from fm_ray.session import PoolSession
from fm_ray.strategies import Selection

RoundHook = Callable[[dict], None]  # called with each finished round's row (Tune reports through it)


def run_experiment(
    cfg: RunConfig, out: str | Path, resume: bool = False, overwrite: bool = False, on_round: RoundHook | None = None
) -> Path:
    check(cfg)
    rundir = RunDir(out)
    check_outside(out, cfg.data.dataset, cfg.data.data_dir, "--out")
    rundir.preflight(resume, overwrite)  # before loading any data
    data = open_source(cfg.data.dataset, data_dir=cfg.data.data_dir, skip_bad=cfg.data.skip_bad_images)
    pool = sample_pool(cfg.data, data, cfg.seed)
    T = len(pool.train_index)
    for name, value in (("--init", cfg.init), ("--budget", cfg.budget or 0)):
        if value > T:
            raise UserError(f"{name} {value} is beyond the pool of {T} samples: lower it or enlarge the pool")
    n_rounds = planned_rounds(cfg, T)
    device = resolve_device(cfg.train.device)
    norm = Normalizer(data.mean, data.std)
    # position i of the pool is train row pool.train_index[i]; the shards read their own rows, the
    # driver only the labeled set (each round) and the test split
    pool_images = data.train.images.subset(pool.train_index)
    y_pool = torch.from_numpy(pool.labels)
    assert data.test is not None  # sample_pool refused a source without a test split
    x_test = data.test.images.read(pool.test_index)
    (_, height, side), C = data.train.images.shape, len(pool.classes)
    if height != side:
        raise UserError(f"{data.name} has {height}x{side} images; the models need square ones: re-pack with --resize N")

    # the pool on its shards for the whole run: the same PoolSession as fm_ray.select and projects
    session = PoolSession(pool_images, range(T), C, norm, cfg.model, cfg.pool, str(device))
    try:
        # only now, with every check passed and the pool built, may --overwrite delete the old run
        rows, queries = rundir.open(cfg, resume, overwrite)
        write_skipped_images(rundir.path, data)
        rid = run_id(cfg)
        labeled = np.union1d(initial_labeled(T, cfg.init, cfg.seed), [q["pool_index"] for q in queries])
        labeled = labeled.astype(np.int64)
        log(
            f"run {rid}: pool {T} ({C} classes), {len(labeled)} labeled, {n_rounds} query rounds of {cfg.batch}, "
            f"strategy {cfg.strategy.name}, {cfg.pool.backend} pool x{cfg.pool.shards}, device {device}"
            + (f", resuming after round {rows[-1]['round']}" if rows else "")
        )
        for r in range(len(rows), n_rounds + 1):
            warm = rundir.load_checkpoint(r - 1) if cfg.train.warm_start and r > 0 else None
            fault_point("train", r)
            lab_t = torch.from_numpy(labeled)
            log(f"round {r}/{n_rounds}: training on {len(labeled)} labels")
            model, fit = fit_round(
                cfg.model,
                cfg.train,
                cfg.seed,
                r,
                pool_images.read(labeled),
                y_pool[lab_t],
                norm,
                data.augment,
                C,
                device,
                warm,
            )
            fault_point("eval", r)
            start = time.perf_counter()
            ev = evaluate(model, x_test, pool.test_labels, norm, device, C)
            eval_s = time.perf_counter() - start
            k = min(cfg.batch, (cfg.budget or T) - len(labeled), T - len(labeled)) if r < n_rounds else 0
            sel, query_s = Selection([]), 0.0
            if k > 0:
                log(f"round {r}/{n_rounds}: test acc {ev['accuracy']:.4f}; querying {k} with {cfg.strategy.name}")
                fault_point("query", r)
                start = time.perf_counter()
                sel = session.select(model, k, labeled, cfg.strategy, cfg.seed, r)
                query_s = time.perf_counter() - start
                # largest selection state any one shard held (issue: per-shard memory report)
                sel.info["selection_state_bytes"] = max(session.pool.map(state_bytes))
                _check_selection(sel, labeled, k, cfg.strategy.name)
            picked = np.array(sel.indices, dtype=np.int64)
            queries += [
                {
                    "run_id": rid,
                    "round": r + 1,
                    "pool_index": int(i),
                    "dataset_index": int(pool.train_index[i]),
                    "label": int(pool.classes[pool.labels[i]]),
                }
                for i in picked
            ]
            row = {
                "run_id": rid,
                "dataset": cfg.data.dataset,
                "setting": cfg.data.setting,
                "strategy": cfg.strategy.name,
                "model": cfg.model.name,
                "seed": cfg.seed,
                "round": r,
                "n_labeled": len(labeled),
                **ev,
                "classes": list(pool.classes),
                "n_queried": len(picked),
                "queried_class_counts": np.bincount(pool.labels[picked], minlength=C).tolist() if k else None,
                "train_epochs": fit["epochs"],
                "train_accuracy": fit["train_accuracy"],
                "train_seconds": fit["train_seconds"],
                "eval_seconds": eval_s,
                "query_seconds": query_s,
                **sel.timings,
                **sel.info,
                "backend": cfg.pool.backend,
                "shards": cfg.pool.shards,
                **_peak_memory(session.pool),
            }
            rows.append(row)
            # order matters for resume: queries, then the row, then the round's weights (see RunDir)
            rundir.write_queries(queries)
            fault_point("queries_written", r)
            rundir.write_rows(rows)
            fault_point("rows_written", r)
            rundir.save_checkpoint(model.state_dict(), r)
            fault_point("checkpointed", r)
            labeled = np.union1d(labeled, picked)
            log(
                f"round {r}/{n_rounds} done: n_labeled {row['n_labeled']}, test acc {ev['accuracy']:.4f}, "
                f"balanced {ev['balanced_accuracy']:.4f} | train {fit['train_seconds']:.1f}s "
                f"({fit['epochs']} ep, train acc {fit['train_accuracy']:.3f}), query {query_s:.1f}s"
            )
            if on_round is not None:
                on_round(row)
    finally:
        session.close()
    return rundir.path


def _peak_memory(sharded: ShardedPool) -> dict[str, float | None]:
    """Peak memory so far of the driver and of the largest shard (RSS; GPU where shards use one)."""
    shards = sharded.map(peak_memory_mb)
    gpu = [g for _, g in shards if g is not None]
    return {
        "driver_peak_rss_mb": peak_rss_mb(),
        "shard_peak_rss_mb": max(r for r, _ in shards),
        "shard_peak_gpu_mb": max(gpu) if gpu else None,
    }


def _check_selection(sel: Selection, labeled: np.ndarray, k: int, name: str) -> None:
    picks = np.array(sel.indices)
    if len(picks) != k or len(np.unique(picks)) != k or np.isin(picks, labeled).any():
        raise RuntimeError(f"strategy {name} returned an invalid batch ({len(picks)} picks, {k} asked)")
