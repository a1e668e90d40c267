"""The active-learning recipe: set up -> rounds (train -> evaluate -> query) -> results per round.

`fm-ray run` and every Ray Tune trial call `run_experiment` with one `RunConfig`. It reads top to
bottom as its phases: `_setup` (data, pool, device) and `_open` (the run directory, resumed or new),
then per round `_train`, `_evaluate`, `_query`, `_record` and `_write_round`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fm_ray._internal.log import log
from fm_ray.config import RunConfig, resolve_backend
from fm_ray.data.core import Dataset, write_skipped_images
from fm_ray.data.normalize import Normalizer
from fm_ray.data.parquet import READ_BYTES
from fm_ray.data.registry import check_outside, open_source
from fm_ray.data.settings import Pool, initial_labeled, sample_pool
from fm_ray.data.source import ImageSource
from fm_ray.errors import UserError
from fm_ray.model.train import evaluate, fit_round, resolve_device
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import peak_memory_mb, peak_rss_mb, state_bytes
from fm_ray.run._faults import fault_point
from fm_ray.run.rundir import RunDir
from fm_ray.run.validate import check, planned_rounds
from fm_ray.session import PoolSession
from fm_ray.strategies import Selection

RoundHook = Callable[[dict], None]  # called with each finished round's row (Tune reports through it)


def run_experiment(
    cfg: RunConfig, out: str | Path, resume: bool = False, overwrite: bool = False, on_round: RoundHook | None = None
) -> Path:
    check(cfg)
    check_outside(out, cfg.data.dataset, cfg.data.data_dir, "--out")
    rundir = RunDir(out)
    rundir.preflight(resume, overwrite)  # before loading any data
    s = _setup(cfg)
    # the pool on its shards for the whole run: the same PoolSession as fm_ray.select and projects
    session = PoolSession(s.pool_images, range(s.size), s.n_classes, s.norm, cfg.model, cfg.pool, str(s.device))
    try:
        # the first query's memory plan, refused before any training when it does not fit
        labeled0 = initial_labeled(s.size, cfg.init, cfg.seed)
        plan = session.check_memory(None, cfg.batch, labeled0, cfg.strategy, str(s.device))
        if plan:
            for line in [f"memory plan of the first query ({cfg.strategy.name}):", *plan.text().splitlines()]:
                log(line)  # one log line each, so every console line carries fm_ray's prefix
        run = _open(s, rundir, resume, overwrite)
        labeled_x = _LabeledPixels(session)
        for r in range(len(run.rows), s.n_rounds + 1):
            model, fit = _train(s, rundir, labeled_x, run.labeled, r)
            ev, eval_s = _evaluate(s, model, r)
            sel, query_s = _query(s, session, model, run.labeled, r, ev)
            row = _record(s, run, session.pool, r, fit, ev, eval_s, sel, query_s)
            _write_round(rundir, run, model.state_dict(), r)
            run.labeled = np.union1d(run.labeled, np.array(sel.indices, dtype=np.int64))
            log(
                f"round {r}/{s.n_rounds} done: n_labeled {row['n_labeled']}, test acc {ev['accuracy']:.4f}, "
                f"balanced {ev['balanced_accuracy']:.4f} | train {fit['train_seconds']:.1f}s "
                f"({fit['epochs']} ep, train acc {fit['train_accuracy']:.3f}), eval {eval_s:.1f}s, query {query_s:.1f}s"
            )
            if on_round is not None:
                on_round(row)
    finally:
        session.close()
    return rundir.path


# ---------------------------------------------------------------------------------------------
# Set-up: what stays the same for every round.


@dataclass(frozen=True)
class _Setup:
    """A run's data, pool and device, checked against the config."""

    cfg: RunConfig
    data: Dataset
    pool: Pool
    n_rounds: int
    device: torch.device
    norm: Normalizer
    # position i of the pool is train row pool.train_index[i]; the shards read their own rows (and
    # the labeled set's, for the driver to train on); the driver reads the test split
    pool_images: ImageSource
    y_pool: torch.Tensor
    x_test: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.pool.train_index)

    @property
    def n_classes(self) -> int:
        return len(self.pool.classes)


def _setup(cfg: RunConfig) -> _Setup:
    """Load the labels (pixels are read on demand), sample the pool and check it fits the run."""
    data = open_source(cfg.data)
    pool = sample_pool(cfg.data, data, cfg.seed)
    T = len(pool.train_index)
    for name, value in (("--init", cfg.init), ("--budget", cfg.budget or 0)):
        if value > T:
            raise UserError(f"{name} {value} is beyond the pool of {T} samples: lower it or enlarge the pool")
    n_rounds = planned_rounds(cfg, T)
    device = resolve_device(cfg.train.device)
    norm = Normalizer(data.mean, data.std)
    pool_images = data.train.images.subset(pool.train_index)
    y_pool = torch.from_numpy(pool.labels)
    assert data.test is not None  # sample_pool refused a source without a test split
    x_test = data.test.images.read(pool.test_index)
    data.test.images.close()
    _, height, side = data.train.images.shape
    if height != side:
        raise UserError(f"{data.name} has {height}x{side} images; the models need square ones: re-pack with --resize N")
    return _Setup(cfg, data, pool, n_rounds, device, norm, pool_images, y_pool, x_test)


@dataclass
class _Progress:
    """The run directory's finished rounds and queries, and the labeled set they imply."""

    run_id: str
    rows: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    labeled: np.ndarray  # sorted pool positions


def _open(s: _Setup, rundir: RunDir, resume: bool, overwrite: bool) -> _Progress:
    """Create, resume or overwrite the run directory; only now, with every check passed and the pool
    built, may --overwrite delete the old run."""
    cfg = s.cfg
    rows, queries = rundir.open(cfg, resume, overwrite)
    write_skipped_images(rundir.path, s.data)
    rid, _ = rundir.stored()  # a resumed run keeps the id it was created with
    labeled = np.union1d(initial_labeled(s.size, cfg.init, cfg.seed), [q["pool_index"] for q in queries])
    labeled = labeled.astype(np.int64)
    log(
        f"run {rid}: pool {s.size} ({s.n_classes} classes), {len(labeled)} labeled, {s.n_rounds} query rounds of "
        f"{cfg.batch}, strategy {cfg.strategy.name}, {resolve_backend(cfg.pool)} pool x{cfg.pool.shards}, device {s.device}"
        + (f", resuming after round {rows[-1]['round']}" if rows else "")
    )
    return _Progress(rid, rows, queries, labeled)


# ---------------------------------------------------------------------------------------------
# One round: train -> evaluate -> query -> record -> write.


class _LabeledPixels:
    """The labeled set's pixels, kept by the driver across rounds (a few thousand images): each
    round fetches only the new picks' from the shards that hold them (`PoolSession.pixels`), so
    the driver never opens a pixel file of the pool and its reads do not grow with the pool."""

    def __init__(self, session: PoolSession):
        self.session = session
        self.held = np.empty(0, dtype=np.int64)  # sorted pool positions
        self.x_u8: torch.Tensor | None = None

    def __call__(self, labeled: np.ndarray) -> torch.Tensor:
        new = np.setdiff1d(labeled, self.held)
        if len(new) or self.x_u8 is None:
            x_new = self.session.pixels(new)
            merged = np.concatenate([self.held, new])
            order = np.argsort(merged, kind="stable")
            x_all = x_new if self.x_u8 is None else torch.cat([self.x_u8, x_new])
            self.held, self.x_u8 = merged[order], x_all[torch.from_numpy(order)]
        return self.x_u8[torch.from_numpy(np.searchsorted(self.held, labeled))]


def _train(
    s: _Setup, rundir: RunDir, labeled_x: _LabeledPixels, labeled: np.ndarray, r: int
) -> tuple[nn.Module, dict[str, float]]:
    """A model trained on the labeled set (from the last round's weights with --warm-start)."""
    cfg = s.cfg
    warm = rundir.load_checkpoint(r - 1) if cfg.train.warm_start and r > 0 else None
    fault_point("train", r)
    log(f"round {r}/{s.n_rounds}: training on {len(labeled)} labels")
    x, y = labeled_x(labeled), s.y_pool[torch.from_numpy(labeled)]
    desc = f"round {r}/{s.n_rounds}"  # the epoch progress lines' prefix
    return fit_round(
        cfg.model, cfg.train, cfg.seed, r, x, y, s.norm, s.data.augment, s.n_classes, s.device, warm, desc=desc
    )


def _evaluate(s: _Setup, model: nn.Module, r: int) -> tuple[dict[str, Any], float]:
    """Test-split metrics, and the seconds they took."""
    fault_point("eval", r)
    start = time.perf_counter()
    ev = evaluate(model, s.x_test, s.pool.test_labels, s.norm, s.device, s.n_classes)
    return ev, time.perf_counter() - start


def _query(
    s: _Setup, session: PoolSession, model: nn.Module, labeled: np.ndarray, r: int, ev: dict[str, Any]
) -> tuple[Selection, float]:
    """The round's batch from the strategy (none after the last round, or once the budget is spent)."""
    cfg, T = s.cfg, s.size
    k = min(cfg.batch, (cfg.budget or T) - len(labeled), T - len(labeled)) if r < s.n_rounds else 0
    if k <= 0:
        return Selection([]), 0.0
    log(f"round {r}/{s.n_rounds}: test acc {ev['accuracy']:.4f}; querying {k} with {cfg.strategy.name}")
    fault_point("query", r)
    start = time.perf_counter()
    sel = session.select(model, k, labeled, cfg.strategy, cfg.seed, r)
    query_s = time.perf_counter() - start
    # largest selection state any one shard held (issue: per-shard memory report)
    sel.info["selection_state_bytes"] = max(session.pool.map(state_bytes))
    return sel, query_s


def _record(
    s: _Setup,
    run: _Progress,
    sharded: ShardedPool,
    r: int,
    fit: dict[str, float],
    ev: dict[str, Any],
    eval_s: float,
    sel: Selection,
    query_s: float,
) -> dict[str, Any]:
    """Add the round's queries and its row (ROUND_SCHEMA) to `run`; returns the row."""
    cfg, pool = s.cfg, s.pool
    picked = np.array(sel.indices, dtype=np.int64)
    run.queries += [
        {
            "run_id": run.run_id,
            "round": r + 1,
            "pool_index": int(i),
            "dataset_index": int(pool.train_index[i]),
            "label": int(pool.classes[pool.labels[i]]),
        }
        for i in picked
    ]
    row = {
        "run_id": run.run_id,
        "dataset": cfg.data.dataset,
        "setting": cfg.data.setting,
        "strategy": cfg.strategy.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "round": r,
        "n_labeled": len(run.labeled),
        **ev,
        "classes": list(pool.classes),
        "n_queried": len(picked),
        "queried_class_counts": np.bincount(pool.labels[picked], minlength=s.n_classes).tolist()
        if len(picked)
        else None,
        "train_epochs": fit["epochs"],
        "train_accuracy": fit["train_accuracy"],
        "train_seconds": fit["train_seconds"],
        "eval_seconds": eval_s,
        "query_seconds": query_s,
        **sel.timings,
        **sel.info,
        # bytes of pool files this process read so far: the driver's (and the shards' with --backend local)
        "driver_read_bytes": sum(READ_BYTES.values()),
        "backend": resolve_backend(cfg.pool),  # what --backend auto became (as PoolSession's)
        "shards": cfg.pool.shards,
        **_peak_memory(sharded),
    }
    run.rows.append(row)
    return row


def _write_round(rundir: RunDir, run: _Progress, weights: dict[str, Any], r: int) -> None:
    """Order matters for resume: queries, then the row, then the round's weights (see RunDir)."""
    rundir.write_queries(run.queries)
    fault_point("queries_written", r)
    rundir.write_rows(run.rows)
    fault_point("rows_written", r)
    rundir.save_checkpoint(weights, r)
    fault_point("checkpointed", r)


def _peak_memory(sharded: ShardedPool) -> dict[str, float | None]:
    """Peak memory so far of the driver and of the largest shard (RSS; GPU where shards use one)."""
    shards = sharded.map(peak_memory_mb)
    gpu = [g for _, g in shards if g is not None]
    return {
        "driver_peak_rss_mb": peak_rss_mb(),
        "shard_peak_rss_mb": max(r for r, _ in shards),
        "shard_peak_gpu_mb": max(gpu) if gpu else None,
    }
