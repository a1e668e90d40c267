"""`PoolSession`: a pool kept on its shards (in-process or Ray actors) across queries.

`fm-ray run`, labeling projects and `fm_ray.select` all query through it: one path from a trained
model to a `Selection`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fm_ray.config import ModelConfig, PoolConfig, StrategyConfig, resolve_backend
from fm_ray.core.memory import Plan
from fm_ray.data.normalize import Normalizer
from fm_ray.data.source import ImageSource, as_source
from fm_ray.errors import DegenerateModelError, UserError
from fm_ray.model.zoo import build_model
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import ShardSpec, member_pixels, member_probs, nonfinite_outputs, set_round
from fm_ray.strategies import SCORE_RTOL, STRATEGIES, QueryContext, Selection, all_equal, check_strategy
from fm_ray.strategies.memory import check_plan, pixels_of, plan_inputs, query_plan


class PoolSession:
    """The pool on its shards (in-process or Ray actors), reused by every `select` call."""

    def __init__(
        self,
        images: ImageSource | torch.Tensor,
        ids: Sequence[Any],
        n_classes: int,
        norm: Normalizer,
        model: nn.Module | ModelConfig,
        pool_cfg: PoolConfig,
        device: str = "cpu",
    ):
        """`model`: a user's module (copied onto each shard) or an fm_ray model config (built there)."""
        if len(ids) != len(as_source(images)):
            raise ValueError("one id per pool sample")
        self.ids = ids if isinstance(ids, range) else list(ids)
        # ids that are the positions themselves (the loop's range(T)) need no pool-sized lookup table
        self.position = None if self.ids == range(len(self.ids)) else {i: p for p, i in enumerate(self.ids)}
        shape = self.shape = as_source(images).shape
        self.planned_pixels = pixels_of(images)  # what the memory plan counts
        channels, side = shape[0], shape[-1]
        if isinstance(model, ModelConfig):
            spec = ShardSpec(model, channels, side, n_classes, norm, device)
        else:
            spec = ShardSpec(None, channels, side, n_classes, norm, device, module=model)
        self.backend = resolve_backend(pool_cfg)  # what `auto` became: the rows record it
        self.spec, self.local = spec, self.backend == "local"
        self.pool: ShardedPool = make_pool(pool_cfg, spec, images)

    def positions(self, ids: Any) -> np.ndarray:
        """The sorted pool positions of `ids`, each once."""
        return np.unique(self._positions(ids))

    def _positions(self, ids: Any) -> np.ndarray:
        """The pool position of each of `ids`, in their order."""
        if self.position is None:
            pos = np.asarray(ids, dtype=np.int64).reshape(-1)
            unknown = pos[(pos < 0) | (pos >= len(self.ids))].tolist()
        else:
            unknown = [i for i in ids if i not in self.position]
            pos = np.array([self.position[i] for i in ids if i in self.position], dtype=np.int64)
        if unknown:
            raise UserError(f"labeled ids not in the pool: {unknown[:5]}: pass ids of pool samples")
        return pos

    def select(
        self,
        model: nn.Module,
        k: int,
        labeled_ids: Any,
        cfg: StrategyConfig,
        seed: int = 0,
        round: int = 0,
        labels: Sequence[int] | np.ndarray | None = None,
        prepared: bool = False,
    ) -> Selection:
        """`labels`: those of `labeled_ids` (model outputs), for strategies that use them; `prepared`:
        `member_probs` has just given the shards this `model` and labeled set (no second send)."""
        check_strategy(cfg)
        labeled = self.positions(labeled_ids)
        free = len(self.ids) - len(labeled)
        if not 0 < k <= free:
            raise UserError(f"k = {k} but {free} pool samples are unlabeled: pick 1..{free}")
        strategy = STRATEGIES[cfg.name]
        plan = self.check_memory(model, k, labeled, cfg)
        if not prepared:
            self.pool.map(set_round, _weights(model) if strategy.needs_model else None, labeled)
        start = time.perf_counter()
        if strategy.needs_model:  # the forward pass over every member (predictions), checked
            _check_outputs(sum(self.pool.map(nonfinite_outputs)), round)
        forward_s = time.perf_counter() - start
        if labels is not None:  # ordered as `labeled` (sorted positions), not as `labeled_ids`
            by_position = dict(zip(self._positions(labeled_ids).tolist(), np.asarray(labels).tolist(), strict=True))
            labels = np.array([by_position[p] for p in labeled.tolist()], dtype=np.int64)
        ctx = QueryContext(round, k, seed, labeled, len(self.ids), cfg, model, labels)
        sel = strategy.select(self.pool, ctx)
        if strategy.needs_model:
            sel.timings["forward_seconds"] = forward_s
        sel.info["plan_peak_mb"] = None if plan is None else plan.largest_process()[2] / 1e6
        _check_selection(sel, labeled, k, free, cfg.name, round)
        sel.ids = [self.ids[i] for i in sel.indices]
        return sel

    def pixels(self, positions: np.ndarray) -> torch.Tensor:
        """uint8 images of pool positions (in their order), read by the shards that hold them."""
        positions = np.asarray(positions, dtype=np.int64)
        C, H, W = self.shape
        out = torch.empty((len(positions), C, H, W), dtype=torch.uint8)
        order = np.argsort(positions, kind="stable")
        for held, x_u8 in self.pool.map(member_pixels, positions):
            out[torch.from_numpy(order[np.searchsorted(positions[order], held)])] = x_u8
        return out

    def member_probs(self, model: nn.Module, positions: np.ndarray, labeled_ids: Any) -> torch.Tensor:
        """`model`'s probabilities of the pool samples at `positions` (sorted), computed on their
        shards; leaves the shards set up for a `select(..., prepared=True)` with the same labeled set."""
        self.pool.map(set_round, _weights(model), self.positions(labeled_ids))
        answers = self.pool.map(member_probs, positions)
        index = torch.cat([i for i, _ in answers])
        return torch.cat([p for _, p in answers])[index.argsort()]  # in the order of (sorted) `positions`

    def check_memory(
        self, model: nn.Module | None, k: int, labeled: np.ndarray, cfg: StrategyConfig, driver: str | None = None
    ) -> Plan | None:
        """The query's memory plan (strategies.memory; None: nothing pool-sized to plan); a UserError
        if it does not fit.
        `model` None: the session's model, built here to count its weights; `driver`: where the
        driver computes (default: the model's device)."""
        if model is None:
            model = self.spec.module
        if model is None:
            assert self.spec.model is not None  # a session holds a module or a model config
            model = build_model(self.spec.model, self.spec.channels, self.spec.side, self.spec.n_classes)
        device = torch.device(driver) if driver else next(model.parameters()).device
        x = plan_inputs(
            model,
            self.spec.n_classes,
            len(self.ids),
            self.pool.n_shards,
            labeled,
            k,
            cfg,
            self.spec.device,
            self.local,
            device,
            pixels=self.planned_pixels,
        )
        plan = query_plan(x)
        check_plan(plan, x, device)
        return plan

    def close(self) -> None:
        self.pool.close()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu() for n, t in model.state_dict().items()}


def make_pool(cfg: PoolConfig, spec: ShardSpec, images: ImageSource | torch.Tensor) -> ShardedPool:
    if resolve_backend(cfg) == "ray":
        from fm_ray.pool.ray_pool import RayPool  # Ray stays optional for the numeric core

        return RayPool(cfg, spec, images)
    from fm_ray.pool.local import LocalPool

    return LocalPool(spec, images, cfg.shards)


_FIX = "training diverged or the weights hold NaN/inf: lower the learning rate (--lr), check the inputs"


def _check_outputs(n_nonfinite: int, round: int) -> None:
    """A query ranks candidates by the model's outputs: with NaN/inf among them it ranks nothing."""
    if n_nonfinite:
        raise DegenerateModelError(
            f"round {round}: the model's outputs on the pool are not finite ({n_nonfinite} NaN/inf values), "
            f"so no query is made: {_FIX}"
        )


def _check_selection(sel: Selection, labeled: np.ndarray, k: int, free: int, name: str, round: int) -> None:
    """Every query passes here: k distinct unlabeled picks, ranked by scores that differ."""
    if free > k and sel.score_range is not None and all_equal(sel.score_range):
        lo, hi = (v + 0.0 for v in sel.score_range)  # + 0.0: print -0 as 0
        raise DegenerateModelError(
            f"round {round}: every candidate scores the same under {name} (scores in [{lo:.6g}, {hi:.6g}], "
            f"spread below {SCORE_RTOL:g} of their scale: a saturated model, or a pool of identical images), so the "
            "picks would be arbitrary: "
            f"{_FIX}, or query with --strategy random"
        )
    picks = np.asarray(sel.indices, dtype=np.int64)
    if len(picks) != k or len(np.unique(picks)) != k or np.isin(picks, labeled).any():
        raise RuntimeError(  # a bug, never the user's input: no strategy may return these
            f"strategy {name} returned an invalid batch ({len(picks)} picks, {len(np.unique(picks))} distinct, "
            f"{int(np.isin(picks, labeled).sum())} already labeled; {k} asked)"
        )
