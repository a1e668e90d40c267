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
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fm_ray.config import DataConfig, ModelConfig, PoolConfig, RunConfig, StrategyConfig
from fm_ray.errors import UserError
from fm_ray.pool import ShardedPool
from fm_ray.pool.shard import ShardSpec, set_round
from fm_ray.pool.source import ImageSource, TensorImages, as_source
from fm_ray.strategies import STRATEGIES, QueryContext, Selection
from fm_ray.train import Normalizer

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
            return self.net(x), self._embed(x)
        last = [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]
        seen: list[torch.Tensor] = []
        handle = last.register_forward_hook(lambda mod, inputs, out: seen.append(inputs[0]))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return logits, seen[-1].flatten(1)


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
        raise UserError("the pool is empty: give at least k + 1 samples")
    items = [pool[i] for i in range(n)]
    xs = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
    try:
        return torch.stack([torch.as_tensor(x) for x in xs])
    except RuntimeError as e:
        raise UserError(f"pool items differ in shape ({e}): resize them to one shape") from None


@dataclasses.dataclass(frozen=True)
class NamedPool:
    """A pool given by name: its ids, its images (read on demand) and their normalization."""

    ids: list[Any]
    images: ImageSource
    norm: Normalizer


def open_named_pool(source: str) -> NamedPool:
    """`parquet:<pool>` (a packed pool's train split, labeled or not), `folder:<path>` (images,
    recursive; ids are relative paths) or `imagefolder:<path>` (its train/ split; ids are indices)."""
    if source.startswith("parquet:"):
        from fm_ray.packed import open_pool

        packed = open_pool(source.split(":", 1)[1])
        ids = packed.columns("train").column("id").to_pylist()
        m = packed.manifest
        return NamedPool(ids, packed.images("train"), Normalizer(tuple(m["mean"]), tuple(m["std"])))
    if source.startswith("folder:"):
        from fm_ray.project import load_pool

        pool = load_pool(RunConfig(data=DataConfig(dataset=source)))
        return NamedPool(list(pool.ids), pool.images, Normalizer(pool.mean, pool.std))
    if source.startswith("imagefolder:"):
        from fm_ray.data import load_dataset

        data = load_dataset(DataConfig(dataset=source))
        return NamedPool(list(range(len(data.train_x))), TensorImages(data.train_x), Normalizer(data.mean, data.std))
    raise UserError(f"pool {source!r}: give parquet:<pool>, folder:<path>, imagefolder:<path>, a Dataset or a tensor")


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
        shape = as_source(images).shape
        channels, side = shape[0], shape[-1]
        if isinstance(model, ModelConfig):
            spec = ShardSpec(model, channels, side, n_classes, norm, device)
        else:
            spec = ShardSpec(None, channels, side, n_classes, norm, device, module=model)
        self.pool: ShardedPool = make_pool(pool_cfg, spec, images)

    def positions(self, ids: Any) -> np.ndarray:
        if self.position is None:
            pos = np.asarray(ids, dtype=np.int64).reshape(-1)
            unknown = pos[(pos < 0) | (pos >= len(self.ids))].tolist()
        else:
            unknown = [i for i in ids if i not in self.position]
            pos = np.array([self.position[i] for i in ids if i in self.position], dtype=np.int64)
        if unknown:
            raise UserError(f"labeled ids not in the pool: {unknown[:5]}: pass ids of pool samples")
        return np.unique(pos)  # sorted, each once

    def select(
        self, model: nn.Module, k: int, labeled_ids: Any, cfg: StrategyConfig, seed: int = 0, round: int = 0
    ) -> Selection:
        if cfg.name not in STRATEGIES:
            raise UserError(f"unknown strategy {cfg.name!r}: choose one of {', '.join(STRATEGIES)}")
        labeled = self.positions(labeled_ids)
        free = len(self.ids) - len(labeled)
        if not 0 < k <= free:
            raise UserError(f"k = {k} but {free} pool samples are unlabeled: pick 1..{free}")
        strategy = STRATEGIES[cfg.name]
        weights = {n: t.detach().cpu() for n, t in model.state_dict().items()} if strategy.needs_model else None
        self.pool.map(set_round, weights, labeled)
        ctx = QueryContext(round, k, seed, labeled, len(self.ids), cfg, model)
        sel = strategy.select(self.pool, ctx)
        sel.ids = [self.ids[i] for i in sel.indices]
        return sel

    def close(self) -> None:
        self.pool.close()


def make_pool(cfg: PoolConfig, spec: ShardSpec, images: ImageSource | torch.Tensor) -> ShardedPool:
    if cfg.backend == "ray":
        from fm_ray.pool.ray_pool import RayPool  # Ray stays optional for the numeric core

        return RayPool(cfg, spec, images)
    from fm_ray.pool.local import LocalPool

    return LocalPool(spec, images, cfg.shards)


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
            used as given (already transformed; uint8 is scaled to [0, 1]); or by name
            `parquet:<pool>` (`fm-ray pack`; ids from its id column), `folder:<path>` (ids are
            relative paths) or `imagefolder:<path>`, normalized with the pool's statistics.
        k: how many to pick.
        labeled: pool id -> label of the samples already labeled (BAIT/FisherMask start their
            Fisher from them; k-center measures distance to them). Never picked again.
        strategy: a name from `fm-ray strategies`.
        backend, shards: `local` (in-process) or `ray` shard actors; the picks are the same.
        device: where the shards compute (default: CUDA when available).
        seed: seeds the strategy's randomness (random, BADGE).
        n_classes: C; default: inferred from one forward pass.
        embed: inputs -> penultimate features, if the model's last `nn.Linear` input is not what you want.
        strategy_options: `StrategyConfig` fields, e.g. `sparsity=0.01`, `lam=1.0`, `backward_steps=1`.

    Returns:
        A `Selection`: `ids` (the k pool ids, pick order), `indices` (their positions), `timings`, `info`.
    """
    fields = {f.name for f in dataclasses.fields(StrategyConfig)} - {"name"}
    unknown = set(strategy_options) - fields
    if unknown:
        raise UserError(f"unknown strategy option(s) {sorted(unknown)}: use {', '.join(sorted(fields))}")
    if isinstance(pool, str):
        named = open_named_pool(pool)
    else:
        x = dataset_tensor(pool)
        named = NamedPool(list(range(len(x))), TensorImages(x), Normalizer((), ()))
    # the caller's model is left as it was (device, train/eval mode): the shards get a copy
    template = as_embedded(copy.deepcopy(model).cpu(), embed).eval()
    if n_classes is None:
        with torch.no_grad():
            n_classes = int(template(named.norm(named.images.read(np.array([0])))).shape[-1])
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pool_cfg = PoolConfig(backend=backend, shards=shards)
    session = PoolSession(named.images, named.ids, n_classes, named.norm, template, pool_cfg, dev)
    try:
        cfg = StrategyConfig(name=strategy, **strategy_options)
        return session.select(template, k, list(labeled or {}), cfg, seed=seed)
    finally:
        session.close()
