"""The active-learning recipe: set up -> rounds (train -> evaluate -> query) -> results per round.

`fm-ray run` and every Ray Tune trial call `run_experiment` with one `RunConfig`. It reads top to
bottom as its phases: `_setup` (data, pool, device) and `_open` (the run directory, resumed or new),
then per round `_train`, `_evaluate`, `_query`, `_record` and `_write_round`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fm_ray._internal.log import log
from fm_ray.config import RunConfig, initial_size, resolve_backend
from fm_ray.core import stopping
from fm_ray.data.core import Dataset, write_skipped_images
from fm_ray.data.normalize import Normalizer
from fm_ray.data.parquet import READ_BYTES
from fm_ray.data.registry import check_outside, open_source
from fm_ray.data.settings import Pool, initial_labeled, sample_pool
from fm_ray.data.source import ImageSource
from fm_ray.errors import UserError
from fm_ray.model.train import evaluate, fit_round, resolve_device, round_seed
from fm_ray.model.zoo import build_model
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
        labeled0 = initial_labeled(s.size, initial_size(cfg), cfg.seed)
        plan = session.check_memory(None, cfg.batch, labeled0, cfg.strategy, str(s.device))
        if plan:
            for line in [f"memory plan of the first query ({cfg.strategy.name}):", *plan.text().splitlines()]:
                log(line)  # one log line each, so every console line carries fm_ray's prefix
        run = _open(s, rundir, resume, overwrite)
        if not len(run.labeled):
            _cold_start(s, session, run)
        stop_set = _stop_set(s, run)
        labeled_x = _LabeledPixels(session)
        for r in range(len(run.rows), s.n_rounds + 1 if not _stopped(run) else 0):
            model, fit = _train(s, rundir, labeled_x, run.labeled, r)
            ev, eval_s = _evaluate(s, model, r)
            stop = _stopping(s, session, model, run, stop_set, r)
            sel, query_s = _query(s, session, model, run.labeled, r, ev, stop["stopped_by"] is not None)
            row = _record(s, run, session.pool, r, fit, ev, eval_s, sel, query_s, stop)
            _write_round(rundir, run, model.state_dict(), r)
            run.labeled = np.union1d(run.labeled, np.array(sel.indices, dtype=np.int64))
            log(
                f"round {r}/{s.n_rounds} done: n_labeled {row['n_labeled']}, test acc {ev['accuracy']:.4f}, "
                f"balanced {ev['balanced_accuracy']:.4f} | train {fit['train_seconds']:.1f}s "
                f"({fit['epochs']} ep, train acc {fit['train_accuracy']:.3f}), eval {eval_s:.1f}s, query {query_s:.1f}s"
            )
            if on_round is not None:
                on_round(row)
            if row["stopped_by"]:
                log(f"round {r}: stopping criterion {row['stopped_by']} holds: the run ends here (--stop)")
                break
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
    stop_preds: list[np.ndarray]  # the stop set's predicted classes after each finished round


def _open(s: _Setup, rundir: RunDir, resume: bool, overwrite: bool) -> _Progress:
    """Create, resume or overwrite the run directory; only now, with every check passed and the pool
    built, may --overwrite delete the old run."""
    cfg = s.cfg
    rows, queries = rundir.open(cfg, resume, overwrite)
    write_skipped_images(rundir.path, s.data)
    rid, _ = rundir.stored()  # a resumed run keeps the id it was created with
    # a cold start's initial set is in the queries (round 0), picked before round 0 trains
    initial = np.array([], dtype=np.int64) if cfg.init_strategy else initial_labeled(s.size, cfg.init, cfg.seed)
    labeled = np.union1d(initial, [q["pool_index"] for q in queries]).astype(np.int64)
    log(
        f"run {rid}: pool {s.size} ({s.n_classes} classes), {len(labeled)} labeled, {s.n_rounds} query rounds of "
        f"{cfg.batch}, strategy {cfg.strategy.name}, {resolve_backend(cfg.pool)} pool x{cfg.pool.shards}, device {s.device}"
        + (f", resuming after round {rows[-1]['round']}" if rows else "")
    )
    run = _Progress(rid, rows, queries, labeled, rundir.read_stop_preds()[: len(rows)])
    if _stopped(run):
        log(f"run {rid} ended at round {rows[-1]['round']}: stopping criterion {rows[-1]['stopped_by']} held (--stop)")
    return run


def _stopped(run: _Progress) -> bool:
    return bool(run.rows and run.rows[-1].get("stopped_by"))


def _cold_start(s: _Setup, session: PoolSession, run: _Progress) -> None:
    """--init-strategy: round 0's labeled set, picked with no labels from the seeded untrained model
    (or the --pretrained / --checkpoint one); recorded as round 0's queries."""
    cfg = s.cfg
    torch.manual_seed(round_seed(cfg.seed, 0))
    channels, _, side = s.pool_images.shape
    model = build_model(cfg.model, channels, side, s.n_classes)
    assert cfg.init_strategy is not None
    strategy = dataclasses.replace(cfg.strategy, name=cfg.init_strategy)
    log(f"cold start: {cfg.init_strategy} picks the {initial_size(cfg)} samples of round 0 with no labels")
    sel = session.select(model, initial_size(cfg), [], strategy, cfg.seed, 0)
    run.queries += _query_rows(s, run, np.array(sel.indices, dtype=np.int64), 0)
    run.labeled = np.sort(np.array(sel.indices, dtype=np.int64))


def _stop_set(s: _Setup, run: _Progress) -> np.ndarray:
    """The stop set: --stop-set seeded pool positions outside round 0's labeled set, the same every round."""
    initial = [q["pool_index"] for q in run.queries if q["round"] == 0]
    if not s.cfg.init_strategy:
        initial = initial_labeled(s.size, s.cfg.init, s.cfg.seed).tolist()
    return stopping.stop_set(s.size, s.cfg.stop_set, s.cfg.seed, np.array(initial, dtype=np.int64))


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


def _stopping(
    s: _Setup, session: PoolSession, model: nn.Module, run: _Progress, stop_set: np.ndarray, r: int
) -> dict[str, Any]:
    """Every stopping criterion's value and verdict on the stop set after round r (row columns), and
    `stopped_by`: the --stop criterion where it holds. Leaves the shards set up for the round's query."""
    cfg = s.cfg
    probs = session.member_probs(model, stop_set, run.labeled)
    run.stop_preds = [*run.stop_preds[:r], probs.argmax(1).numpy()]
    verdicts = stopping.verdicts(np.stack(run.stop_preds), probs, s.n_classes, len(run.labeled), cfg.budget)
    out: dict[str, Any] = {}
    for name, (holds, value) in verdicts.items():
        out |= {
            f"stop_{name}": None if math.isnan(value) else value,
            f"stop_{name}_holds": holds,
        }  # null: too few rounds
    out["stopped_by"] = cfg.stop if cfg.stop is not None and verdicts[cfg.stop][0] else None
    return out


def _query(
    s: _Setup,
    session: PoolSession,
    model: nn.Module,
    labeled: np.ndarray,
    r: int,
    ev: dict[str, Any],
    stopped: bool,
) -> tuple[Selection, float]:
    """The round's batch from the strategy (none after the last round, once the budget is spent, or
    where --stop's criterion holds)."""
    cfg, T = s.cfg, s.size
    k = min(cfg.batch, (cfg.budget or T) - len(labeled), T - len(labeled)) if r < s.n_rounds and not stopped else 0
    if k <= 0:
        return Selection([]), 0.0
    log(f"round {r}/{s.n_rounds}: test acc {ev['accuracy']:.4f}; querying {k} with {cfg.strategy.name}")
    fault_point("query", r)
    start = time.perf_counter()
    labels = s.pool.labels[labeled]  # the labeled set's (strategies that balance classes use them)
    sel = session.select(model, k, labeled, cfg.strategy, cfg.seed, r, labels=labels, prepared=True)
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
    stop: dict[str, Any],
) -> dict[str, Any]:
    """Add the round's queries and its row (ROUND_SCHEMA) to `run`; returns the row."""
    cfg, pool = s.cfg, s.pool
    picked = np.array(sel.indices, dtype=np.int64)
    run.queries += _query_rows(s, run, picked, r + 1)
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
        **stop,
    }
    run.rows.append(row)
    return row


def _query_rows(s: _Setup, run: _Progress, picked: np.ndarray, round_: int) -> list[dict[str, Any]]:
    """QUERY_SCHEMA rows of `picked` (round 0: a cold start's initial set; r + 1: round r's query)."""
    pool = s.pool
    return [
        {
            "run_id": run.run_id,
            "round": round_,
            "pool_index": int(i),
            "dataset_index": int(pool.train_index[i]),
            "label": int(pool.classes[pool.labels[i]]),
        }
        for i in picked
    ]


def _write_round(rundir: RunDir, run: _Progress, weights: dict[str, Any], r: int) -> None:
    """Order matters for resume: queries, then the row, then the round's weights (see RunDir)."""
    rundir.write_queries(run.queries)
    fault_point("queries_written", r)
    rundir.write_stop_preds(np.stack(run.stop_preds))  # before the row: a resume keeps as many as rows
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
