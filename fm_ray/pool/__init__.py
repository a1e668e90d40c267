"""The pool abstraction: shards of the unlabeled pool, driven in-process (LocalPool) or on Ray actors.

A strategy calls ``pool.map(fn, *args)``: every shard runs ``fn(shard, *args)`` (``fn`` a module-level
function beside the strategy that needs it) and the answers come back in shard order, as Ray Train's
``WorkerGroup.execute(fn, *args)``. Typed end to end: a type checker follows ``fn``'s signature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

import numpy as np
import torch

from fm_ray._internal.log import log

if TYPE_CHECKING:
    from fm_ray.pool.shard import PoolShard

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


class ShardedPool(Protocol):
    """What strategies see: run one function on every shard, answers in shard order."""

    n_shards: int

    def map(self, fn: Callable[Concatenate[PoolShard, P], R], /, *args: P.args, **kwargs: P.kwargs) -> list[R]: ...

    def map_sum(self, fn: Callable[Concatenate[PoolShard, P], R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn`` on every shard, the answers added up (``add_into``); the Ray pool adds them among
        the shards, so the driver receives one sum, not one answer per shard."""
        ...

    def close(self) -> None: ...


def add_into(acc: Any, x: Any) -> Any:
    """``acc + x`` for answers made of tensors, numbers and None (None + None = None), tuples of
    them elementwise; tensors are added in place into ``acc`` (which the caller owns)."""
    if isinstance(acc, tuple):
        return tuple(add_into(a, b) for a, b in zip(acc, x, strict=True))
    if acc is None or x is None:
        assert acc is None and x is None, "a partial sum on one shard but not on another"
        return None
    if isinstance(acc, torch.Tensor):
        return acc.add_(x.to(acc.device))
    return acc + x


class PoolStateCall(Generic[S]):
    """A ``StateCall`` (core.greedy) for the selection drivers: runs ``fn(state, *args)`` on each
    shard's current selection state, which must be a ``kind`` (else the shard was never built)."""

    def __init__(self, pool: ShardedPool, kind: type[S]) -> None:
        self.pool, self.kind = pool, kind

    def __call__(self, fn: Callable[Concatenate[S, P], R], /, *args: P.args, **kwargs: P.kwargs) -> list[R]:
        from fm_ray.pool.shard import on_state

        return self.pool.map(on_state, self.kind, fn, *args, **kwargs)


def state_call(pool: ShardedPool, kind: type[S]) -> PoolStateCall[S]:
    return PoolStateCall(pool, kind)


def partition(n: int, shards: int, block: int) -> list[np.ndarray]:
    """Contiguous pool positions per shard, cut on `block` boundaries; never an empty shard.

    Cutting on blocks keeps every sample in the same inference batch for any shard count, so its
    floating-point results (and hence the picks) do not depend on the partition. A pool of fewer
    blocks than `shards` gets one shard per block (see `shard_parts`).
    """
    n_blocks = -(-n // block)
    shards = max(1, min(shards, n_blocks))
    cuts = [min(n, (n_blocks * i // shards) * block) for i in range(shards + 1)]
    return [np.arange(cuts[i], cuts[i + 1]) for i in range(shards)]


def shard_parts(n: int, shards: int, block: int) -> list[np.ndarray]:
    """`partition`, saying so in one line when the pool is too small for `shards`."""
    parts = partition(n, shards, block)
    if len(parts) < shards:
        log(
            f"a pool of {n} samples fills {len(parts)} block(s) of {block}: running {len(parts)} shard(s), "
            f"not {shards} (the picks are the same)"
        )
    return parts
