"""The in-process pool: N `PoolShard`s called one after another."""

from __future__ import annotations

from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

import torch

from fm_ray.data.source import ImageSource, as_source
from fm_ray.pool import add_into, shard_parts
from fm_ray.pool.shard import BLOCK, PoolShard, ShardSpec

P = ParamSpec("P")
R = TypeVar("R")


class LocalPool:
    def __init__(self, spec: ShardSpec, images: ImageSource | torch.Tensor, shards: int = 1):
        source = as_source(images)
        parts = shard_parts(len(source), shards, BLOCK)
        self.shards = [PoolShard(spec, source.subset(p), p) for p in parts]
        self.n_shards = len(self.shards)

    def map(self, fn: Callable[Concatenate[PoolShard, P], R], /, *args: P.args, **kwargs: P.kwargs) -> list[R]:
        return [fn(s, *args, **kwargs) for s in self.shards]

    def map_sum(self, fn: Callable[Concatenate[PoolShard, P], R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Answers added in shard order, each into the first as soon as it is made (then freed)."""
        total = fn(self.shards[0], *args, **kwargs)
        for s in self.shards[1:]:
            total = add_into(total, fn(s, *args, **kwargs))
        return total

    def close(self) -> None:
        self.shards = []
