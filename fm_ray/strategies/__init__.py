"""Query strategies: one dict registry; each declares what it needs from the pool.

A strategy is a function `(pool, ctx) -> Selection`; the loop never looks at which one it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fm_ray.config import StrategyConfig, validate_strategy
from fm_ray.core.memory import Plan
from fm_ray.errors import UserError
from fm_ray.pool import ShardedPool


@dataclass(frozen=True)
class QueryContext:
    round: int
    k: int  # samples to pick this round
    seed: int
    labeled: np.ndarray  # global pool positions already labeled
    pool_size: int
    cfg: StrategyConfig
    model: torch.nn.Module  # the driver's copy (for parameter layout; shards hold their own)
    labels: np.ndarray | None = None  # the labels of `labeled` (model outputs 0..C-1), where the caller has them


@dataclass
class Selection:
    indices: list[int]  # global pool positions, in pick order
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the mask profile
    ids: list[Any] = field(default_factory=list)  # the pool ids of `indices` (fm_ray.select fills them)
    # (min, max) over every candidate of the score the first pick was ranked by; None: no scores (random)
    score_range: tuple[float, float] | None = None


def by_position(answers: list[tuple[torch.Tensor, torch.Tensor]], pool_size: int) -> torch.Tensor:
    """The shards' (global positions, rows) answers as one pool-sized tensor, row i = pool position i."""
    rows = answers[0][1]
    out = torch.empty(pool_size, *rows.shape[1:], dtype=rows.dtype)
    out[torch.cat([i for i, _ in answers])] = torch.cat([r for _, r in answers])
    return out


# Scores closer than this, relative to their scale, rank nothing (docs/method.md). The networks run in
# float32 (eps 1.2e-7): identical candidates at other positions of a batch differ by a few ulps (FisherMask
# at --sparsity 1 on identical inputs: 1e-7 apart), so "equal" is about 80 ulps, not float64's 1e-9.
SCORE_RTOL = 1e-5


def merge_ranges(ranges: list[tuple[float, float] | None]) -> tuple[float, float] | None:
    """One (min, max) from the shards' answers (None and empty shards left out; NaN wins)."""
    known = [r for r in ranges if r is not None and not r[0] > r[1]]  # (inf, -inf): no candidates
    if not known:
        return None
    if any(math.isnan(lo) or math.isnan(hi) for lo, hi in known):
        return math.nan, math.nan
    return min(lo for lo, _ in known), max(hi for _, hi in known)


def spread_range(rows_N_D: torch.Tensor) -> tuple[float, float] | None:
    """(min, max) of each candidate's squared distance to the candidates' mean row: the score range
    of a strategy that ranks by where its candidates lie (features, probabilities) rather than by
    one score (TypiClust, ProbCover, GALAXY). Identical candidates give (0, 0): nothing to rank."""
    if not len(rows_N_D):
        return None
    rows = rows_N_D.double()
    dist_N = ((rows - rows.mean(0)) ** 2).sum(1)
    return float(dist_N.min()), float(dist_N.max())


def all_equal(score_range: tuple[float, float]) -> bool:
    """True when the candidates' scores cannot tell them apart: NaN, all the same infinity, or
    ``max - min <= SCORE_RTOL * max(|min|, |max|)`` (so also exactly equal, e.g. all 0)."""
    lo, hi = score_range
    if math.isnan(lo) or math.isnan(hi):
        return True
    if math.isinf(lo) or math.isinf(hi):
        return lo == hi
    return hi - lo <= SCORE_RTOL * max(abs(lo), abs(hi))


@dataclass(frozen=True)
class Pixels:
    """How the shards read the pool's images, for the plan: one image's shape, bytes per value, and
    whether they are streamed (a packed pool: read row group by row group, never all held) or held
    in RAM (a tensor: each shard holds its members')."""

    shape: tuple[int, ...]
    itemsize: int = 1
    streamed: bool = True


@dataclass(frozen=True)
class PlanInputs:
    """What a strategy's memory plan is computed from, before any work (strategies.memory)."""

    n_params: int  # the model's parameter count
    n_classes: int
    feat_dim: int  # E: the input width of the model's final nn.Linear
    activations: int  # outputs of all leaf modules for one sample (the Fisher passes' workspace scales with it)
    shard_members: list[int]  # pool samples per shard
    shard_free: list[int]  # unlabeled samples per shard
    n_labeled: int
    k: int
    cfg: StrategyConfig
    shard_gpu: bool
    driver_gpu: bool
    local: bool  # the shards run in the driver's process
    pixels: Pixels | None = None  # None: the pixels are not planned
    largest_output: int = 0  # the largest leaf module's output for one sample (0: not planned)


@dataclass(frozen=True)
class Strategy:
    select: Callable[[ShardedPool, QueryContext], Selection]
    needs_model: bool = True  # False: shards need no weights this round (random)
    doc: str = ""
    # its own large items, beside what every shard holds (strategies.memory.pool_items); None: none
    plan: Callable[[PlanInputs], Plan | None] | None = None
    stochastic: bool = False  # ranks by a score, so --stochastic can draw its batch instead
    cold_start: bool = False  # picks well with no labels (an --init-strategy)
    # StrategyConfig fields that only the strategies listing them read: a run of any other strategy
    # computes the same whatever their value, so its identity (run/rundir.py) leaves them out
    own_options: tuple[str, ...] = ()


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, strategy: Strategy) -> None:
    STRATEGIES[name] = strategy


def check_strategy(cfg: StrategyConfig) -> None:
    """The strategy exists and takes the options given (a UserError naming the fix otherwise)."""
    validate_strategy(cfg)
    if cfg.name not in STRATEGIES:
        raise UserError(f"unknown strategy {cfg.name!r}: choose one of {', '.join(STRATEGIES)}")
    if cfg.stochastic is not None and not STRATEGIES[cfg.name].stochastic:
        takes = ", ".join(n for n, s in STRATEGIES.items() if s.stochastic)
        raise UserError(
            f"--stochastic draws the batch of a score strategy ({takes}), not of {cfg.name}: drop --stochastic "
            "or choose one of those"
        )


def _load_builtins() -> None:
    from fm_ray.strategies import bayes, coldstart, diversity, fisher, imbalance, uncertainty  # noqa: F401  (they register)


_load_builtins()
