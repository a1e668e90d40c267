"""Shard actors that die are always noticed: killed while idle between two pool calls (Ray restarts
them with an empty shard before the next call), during the Fisher embeddings, during a greedy step,
or two at once. Each time the round ends with exactly the local pool's picks and `restarts` counts
every restart."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.exceptions import RayActorError

from fm_ray.config import PoolConfig
from fm_ray.core.greedy import GreedyState
from fm_ray.pool import partition
from fm_ray.pool.local import LocalPool
from fm_ray.pool.ray_pool import RayPool
from fm_ray.pool.shard import BLOCK, on_state, pid, set_round
from fm_ray.strategies import STRATEGIES
from fm_ray.strategies.fisher import build_greedy_state

pytestmark = pytest.mark.ray
SHARDS = 2


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # DieOnce travels to the actors by value
    yield
    ray.shutdown()


def select(pool, trained, strategy: str = "fishermask") -> list[int]:
    pool.map(set_round, trained["weights"], trained["labeled"])
    return STRATEGIES[strategy].select(pool, trained["context"](strategy)).indices


@pytest.fixture(scope="module")
def local_picks(trained) -> dict[str, list[int]]:
    return {s: select(LocalPool(trained["spec"], trained["x_pool"], 1), trained, s) for s in ("fishermask", "badge")}


@pytest.fixture
def pool(trained):
    p = RayPool(PoolConfig(backend="ray", shards=SHARDS), trained["spec"], trained["x_pool"])
    yield p
    p.close()


@dataclasses.dataclass(frozen=True)
class DieOnce:
    """Runs `fn(shard, ...)`; on the shard whose first member is `first_index`, the first time only
    (a marker file), the actor's process then kills itself before its answer leaves."""

    fn: Callable[..., Any]
    first_index: int
    marker: str

    def __call__(self, shard, *args: Any) -> Any:
        out = self.fn(shard, *args)
        if int(shard.index_N[0]) == self.first_index and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return out


def first_member(trained, shard: int) -> int:
    return int(partition(len(trained["x_pool"]), SHARDS, BLOCK)[shard][0])


def intercept(pool: RayPool, target: Callable, nth: int, action: Callable[[Callable], Callable]) -> None:
    """Before the `nth` pool call of `target` (a shard function or a state method), through `map`
    or `map_sum` (partial sums reduced among the shards), swap its function for `action(fn)`."""
    seen = {"n": 0}

    def wrap(original: Callable) -> Callable:
        def call(fn, *args):
            if (args[1] if fn is on_state else fn) is target:
                seen["n"] += 1
                if seen["n"] == nth:
                    fn = action(fn)
            return original(fn, *args)

        return call

    pool.map = wrap(pool.map)  # type: ignore[method-assign]
    pool.map_sum = wrap(pool.map_sum)  # type: ignore[method-assign]


def kill_and_wait(pool: RayPool, shards: list[int]) -> None:
    """ray.kill the shards' actors (Ray restarts them) and wait until every one answers as a new process."""
    before = {i: ray.get(pool.actors[i].token.remote()) for i in shards}
    for i in shards:
        ray.kill(pool.actors[i], no_restart=False)
    deadline = time.monotonic() + 600  # waits on the new incarnation; the ceiling only stops a hang
    for i in shards:
        while True:
            try:
                if ray.get(pool.actors[i].token.remote()) != before[i]:
                    break
            except RayActorError:
                pass
            assert time.monotonic() < deadline, "Ray did not restart the shard actor"
            time.sleep(0.2)


@pytest.mark.parametrize("strategy", ["fishermask", "badge"])
def test_killed_while_idle_between_calls(trained, local_picks, pool, strategy):
    """The silent case: the restarted actor would answer from a fresh shard (random weights, no
    labeled set) without any error; the incarnation check catches it and replays `set_round`."""
    pids = pool.map(pid)
    pool.map(set_round, trained["weights"], trained["labeled"])
    kill_and_wait(pool, [1])
    picks = STRATEGIES[strategy].select(pool, trained["context"](strategy)).indices
    assert picks == local_picks[strategy]
    assert pool.restarts == 1
    new = pool.map(pid)
    assert new[0] == pids[0] and new[1] != pids[1]


def test_killed_during_fisher_embeddings(trained, local_picks, pool, tmp_path):
    die = lambda fn: DieOnce(fn, first_member(trained, 1), str(tmp_path / "died"))
    intercept(pool, build_greedy_state, 1, die)
    assert select(pool, trained) == local_picks["fishermask"]
    assert (tmp_path / "died").exists() and pool.restarts == 1


def test_killed_during_a_greedy_step(trained, local_picks, pool, tmp_path):
    die = lambda fn: DieOnce(fn, first_member(trained, 1), str(tmp_path / "died"))
    intercept(pool, GreedyState.step, 4, die)
    assert select(pool, trained) == local_picks["fishermask"]
    assert (tmp_path / "died").exists() and pool.restarts == 1


def test_two_shards_killed_at_once_mid_selection(trained, local_picks, pool):
    def kill_both(fn):
        kill_and_wait(pool, [0, 1])
        return fn

    intercept(pool, GreedyState.step, 3, kill_both)
    assert select(pool, trained) == local_picks["fishermask"]
    assert pool.restarts == 2
