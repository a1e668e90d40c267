"""`fm_ray.select`: one query step from Python, with any classifier and any pool.

    import fm_ray
    sel = fm_ray.select(model, pool_dataset, k=100, labeled={3: 1, 17: 0}, strategy="fishermask")
    sel.ids        # the k chosen pool ids, in pick order

It does not train the model. `fm-ray run`, labeling projects and this function share one path: a
`PoolSession` (the pool on its shards, kept across rounds) whose `select` runs a registered strategy.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from fm_ray._internal import boundary
from fm_ray._internal.boundary import summary
from fm_ray.config import PoolConfig, StrategyConfig
from fm_ray.data.normalize import Normalizer
from fm_ray.data.registry import open_source
from fm_ray.data.source import TensorImages
from fm_ray.errors import ArgumentTypeError, ArgumentValueError, DegenerateModelError, InternalError, UserError
from fm_ray.session import PoolSession
from fm_ray.strategies import STRATEGIES, Selection

__all__ = ["select", "Selection", "PoolSession", "UserError", "DegenerateModelError", "InternalError", "Embedded"]

Embed = Callable[[torch.Tensor], torch.Tensor]  # inputs -> penultimate features (N, E)


class Embedded(nn.Module):
    """Any classifier `x -> logits` with `embed(x) -> (logits, features)`, as fm_ray's own models have.

    The features (what BAIT, BADGE and k-center use) are the input of the model's last `nn.Linear`,
    caught by a forward hook, unless the user passes an `embed` callable.
    """

    def __init__(self, net: nn.Module, embed: Embed | None = None):
        super().__init__()
        self.net = net
        self._embed = embed
        if embed is None and not any(isinstance(m, nn.Linear) for m in net.modules()):
            raise UserError(
                "the model has no nn.Linear layer to take penultimate features from: pass embed=<callable x -> features>"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._embed is not None:
            return self.net(x), _features(self._embed(x), len(x))
        last = [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]
        seen: list[torch.Tensor] = []
        handle = last.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return logits, seen[-1].flatten(1)


def _features(feats: Any, n: int) -> torch.Tensor:
    """An `embed=` callable's answer for n inputs as (n, E) float32, else one line naming its shape."""
    if not isinstance(feats, torch.Tensor) or feats.ndim < 2 or feats.shape[0] != n:
        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ArgumentValueError(f"embed must map {n} inputs to features ({n}, E), got {got}: return one row per input")
    return feats.flatten(1).float()


def as_embedded(model: nn.Module, embed: Embed | None = None) -> nn.Module:
    """fm_ray's models already have `embed`; anything else is wrapped."""
    if embed is None and callable(getattr(model, "embed", None)):
        return model
    return Embedded(model, embed)


def dataset_tensor(pool: Any) -> torch.Tensor:
    """A torch Dataset (items `x` or `(x, y, ...)`) or a tensor -> one (N, ...) tensor of its inputs."""
    if isinstance(pool, torch.Tensor):
        return pool
    try:
        n = len(pool)
    except TypeError:
        raise UserError("pool must be a torch Dataset with len(), a tensor, or 'parquet:'/'folder:' text") from None
    if n == 0:
        raise ArgumentValueError("pool is empty: give at least k samples")
    items = [pool[i] for i in range(n)]
    xs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    try:
        return torch.stack([torch.as_tensor(x) for x in xs])
    except RuntimeError as e:
        raise UserError(f"pool items differ in shape ({e}): resize them to one shape") from None


@boundary.api
def select(
    model: nn.Module,
    pool: Any,
    k: int,
    *,
    labeled: dict[Any, Any] | None = None,
    strategy: str = "fishermask",
    backend: str = "local",
    shards: int = 1,
    device: str | None = None,
    seed: int = 0,
    n_classes: int | None = None,
    embed: Embed | None = None,
    **strategy_options: Any,
) -> Selection:
    """Pick `k` pool samples to label next with a registered strategy; the model is not trained.

    Args:
        model: any `nn.Module` mapping a batch of pool inputs to logits (N, C).
        pool: a torch `Dataset` (items `x` or `(x, y)`; ids are the integer indices) or a tensor,
            used as given (already transformed; uint8 is scaled to [0, 1]); or any data source by
            name (`fm_ray.data.registry`): `parquet:<pool>` (`fm-ray pack`; ids from its id column),
            `folder:<path>`, `imagefolder:<path>`, `csv:<file>` (ids are paths relative to the
            source), `fashion_mnist`, `cifar10` (ids `train/<row>`); its train split, normalized
            with the source's statistics.
        k: how many to pick.
        labeled: pool id -> label of the samples already labeled (BAIT/FisherMask start their
            Fisher from them; k-center measures distance to them). Never picked again.
        strategy: a name from `fm-ray strategies`.
        backend, shards: `local` (in-process) or `ray` shard actors; the picks are the same.
        device: where the shards compute (default: CUDA when available).
        seed: seeds the strategy's randomness (random, BADGE, MC dropout, stochastic batches).
        n_classes: C; default: inferred from one forward pass.
        embed: inputs -> penultimate features, if the model's last `nn.Linear` input is not what you want.
        strategy_options: `StrategyConfig` fields, e.g. `sparsity=0.01`, `lam=1.0`, `backward_steps=1`,
            `mc_samples=20` (bald, batchbald), `stochastic="power", beta=1.0` (entropy, margin,
            least_confidence, bald).

    Returns:
        A `Selection`: `ids` (the k pool ids, pick order), `indices` (their positions), `timings`, `info`.
    """
    _check_static(model, k, labeled, strategy, n_classes, strategy_options)
    if isinstance(pool, str):
        data = open_source(pool)  # any registered source; its train split is the pool
        ids: list[Any] = list(data.train.ids)
        images, norm = data.train.images, data.norm
    else:
        x = dataset_tensor(pool)
        ids = list(range(len(x)))
        images, norm = TensorImages(x), Normalizer((), ())
    if len(ids) == 0:
        where = f" {pool!r}" if isinstance(pool, str) else ""
        raise ArgumentValueError(f"pool{where} is empty: give at least k samples")
    labeled_ids = list(labeled or {})
    _check_in_pool(k, labeled_ids, ids)
    # the caller's model is left as it was (device, train/eval mode): the shards get a copy
    # float32 whatever the model's dtype: the pool's inputs are float32 and half is slow or missing on CPUs
    template = as_embedded(copy.deepcopy(model).cpu().float(), embed).eval()
    n_classes = _model_classes(template, norm(images.read(np.array([0]))), n_classes)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pool_cfg = PoolConfig(backend=backend, shards=shards)
    session = PoolSession(images, ids, n_classes, norm, template, pool_cfg, dev)
    try:
        cfg = StrategyConfig(name=strategy, **strategy_options)
        classes = list((labeled or {}).values())
        known = all(isinstance(c, numbers.Integral) and 0 <= int(c) < n_classes for c in classes)  # model outputs
        return session.select(template, k, labeled_ids, cfg, seed=seed, labels=classes if known else None)
    finally:
        session.close()


def _check_static(model: Any, k: Any, labeled: Any, strategy: Any, n_classes: Any, options: dict[str, Any]) -> None:
    """Arguments checked before any pool is read: one ValueError/TypeError naming the argument."""
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ArgumentTypeError(f"k must be a positive int, got {k!r} ({type(k).__name__})")
    if k <= 0:
        raise ArgumentValueError(f"k = {k}: pick at least 1 sample")
    if labeled is not None and not isinstance(labeled, Mapping):
        raise ArgumentTypeError(f"labeled must be a dict of pool id -> label, got {type(labeled).__name__}")
    if strategy not in STRATEGIES:
        raise ArgumentValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if n_classes is not None and (
        isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 2
    ):
        raise ArgumentValueError(f"n_classes must be an int >= 2 (or None: inferred), got {n_classes!r}")
    fields = {f.name for f in dataclasses.fields(StrategyConfig)} - {"name"}
    unknown = set(options) - fields
    if unknown:
        raise ArgumentValueError(f"unknown strategy option(s) {sorted(unknown)}: use {', '.join(sorted(fields))}")


def _check_in_pool(k: int, labeled_ids: list[Any], ids: Any) -> None:
    known = set(ids)
    unknown = [i for i in labeled_ids if i not in known]
    if unknown:
        raise ArgumentValueError(f"labeled ids not in the pool: {unknown[:5]}: pass ids of pool samples")
    free = len(known) - len(set(labeled_ids))
    if k > free:
        raise ArgumentValueError(f"k = {k} but {free} pool samples are unlabeled: pick 1..{free}")


def _model_classes(template: nn.Module, x_1: torch.Tensor, n_classes: int | None) -> int:
    """The model's number of outputs per sample (one forward pass and one `embed` on `x_1`), checked
    against `n_classes`; the user's code failing on a pool input is one line naming it."""
    try:
        with torch.no_grad():
            out = template(x_1)
            if isinstance(out, torch.Tensor):
                template.embed(x_1)  # type: ignore[operator]
    except UserError:
        raise
    except Exception as e:
        raise ArgumentValueError(
            f"the model (or embed=) fails on a batch of 1 pool input of shape {tuple(x_1.shape)}, float32 "
            f"({summary(e)}): make it accept the pool's inputs"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ArgumentTypeError(
            f"model must return a logits tensor (N, C), got a {type(out).__name__}: wrap it in an nn.Module "
            "whose forward returns the logits only"
        )
    if out.ndim != 2:
        raise ArgumentValueError(f"model must map a batch to logits (N, C), got an output of shape {tuple(out.shape)}")
    if n_classes is not None and n_classes != out.shape[1]:
        raise ArgumentValueError(f"n_classes = {n_classes} but the model outputs {out.shape[1]} logits per sample")
    return int(out.shape[1])
