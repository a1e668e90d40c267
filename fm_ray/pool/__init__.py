"""The pool abstraction: shards of the unlabeled pool, driven in-process (LocalPool) or on Ray actors."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from fm_ray.core.greedy import ShardCall


class ShardedPool(Protocol):
    """What strategies see: call one `PoolShard` method on every shard, answers in shard order."""

    n_shards: int

    def map(self, method: str, *args: Any) -> list[Any]: ...

    def close(self) -> None: ...


def state_call(pool: ShardedPool) -> ShardCall:
    """A `ShardCall` for the selection drivers: forwards to each shard's current selection state."""
    return lambda method, *args: pool.map("state_call", method, *args)


def partition(n: int, shards: int, block: int) -> list[np.ndarray]:
    """Contiguous pool positions per shard, cut on `block` boundaries.

    Cutting on blocks keeps every sample in the same inference batch for any shard count, so its
    floating-point results (and hence the picks) do not depend on the partition.
    """
    n_blocks = -(-n // block)
    cuts = [min(n, (n_blocks * i // shards) * block) for i in range(shards + 1)]
    return [np.arange(cuts[i], cuts[i + 1]) for i in range(shards)]
