"""The in-process pool: N `PoolShard`s called one after another."""

from __future__ import annotations

from typing import Any

import torch

from fm_ray.pool import partition
from fm_ray.pool.shard import BLOCK, PoolShard, ShardSpec
from fm_ray.pool.source import ImageSource, as_source


class LocalPool:
    def __init__(self, spec: ShardSpec, images: ImageSource | torch.Tensor, shards: int = 1):
        source = as_source(images)
        parts = partition(len(source), shards, BLOCK)
        self.shards = [PoolShard(spec, source.subset(p), p) for p in parts]
        self.n_shards = len(self.shards)

    def map(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.shards]

    def close(self) -> None:
        self.shards = []
