"""Checks of a run config that need no data (so bad input fails before anything loads), and the
round plan. Above the model zoo and the strategy registry, which it consults."""

from __future__ import annotations

from fm_ray.config import RunConfig, initial_size, rounds_for_budget, validate
from fm_ray.errors import UserError
from fm_ray.model.zoo import check_model, features_model
from fm_ray.strategies import STRATEGIES, check_strategy


def planned_rounds(cfg: RunConfig, pool_size: int) -> int:
    """Query rounds: --rounds, capped by the budget and by the pool running out."""
    cap = min(cfg.budget or pool_size, pool_size)
    n = rounds_for_budget(initial_size(cfg), cfg.batch, cap)
    return n if cfg.rounds is None else min(cfg.rounds, n)


def check(cfg: RunConfig) -> None:
    """Every check that needs no data, so bad input fails before anything is loaded."""
    validate(cfg)
    check_strategy(cfg.strategy)
    check_model(cfg.model)
    if cfg.strategy.features is not None:
        check_model(features_model(cfg.strategy.features, cfg.model))
    if cfg.init_strategy is not None and not getattr(STRATEGIES.get(cfg.init_strategy), "cold_start", False):
        cold = [n for n, s in STRATEGIES.items() if s.cold_start]
        raise UserError(
            f"--init-strategy {cfg.init_strategy!r} cannot pick with no labels: choose one of {', '.join(cold)}"
        )
