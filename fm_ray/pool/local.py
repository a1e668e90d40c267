"""The in-process pool: N `PoolShard`s called one after another."""

from __future__ import annotations

from typing import Any

import torch

from fm_ray.pool import partition
from fm_ray.pool.shard import BLOCK, PoolShard, ShardSpec


class LocalPool:
    def __init__(self, spec: ShardSpec, x_u8: torch.Tensor, shards: int = 1):
        parts = partition(len(x_u8), shards, BLOCK)
        self.shards = [PoolShard(spec, x_u8[torch.from_numpy(p)], p) for p in parts]
        self.n_shards = len(self.shards)

    def map(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.shards]

    def close(self) -> None:
        self.shards = []
