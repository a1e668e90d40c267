"""The pool on Ray: one actor per shard wrapping the same `PoolShard` the local pool runs.

Ray is the transport only. Large arguments (model weights, masks, a greedy step's factors) are
`ray.put` once per call and shared by every actor; tensors cross the wire on the CPU (the shard
and the driver move them to their own devices on arrival).

Restarts: a shard actor that dies is restarted by Ray (`max_restarts=-1`) with a fresh, empty
`PoolShard`. Every actor draws an incarnation token in `__init__`; every call carries the token
the pool last saw, and an actor whose token differs runs nothing and answers its own. Whether the
actor died during the call (RayActorError) or while idle between calls (token mismatch), the pool
replays this round's state-changing calls (they are deterministic, and `set_round` starts from a
clean shard) and re-issues the call, so the round completes with the same picks; `restarts`
counts every new incarnation seen.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fm_ray._internal.ray_session import ray_log_level
from fm_ray.config import PoolConfig
from fm_ray.data.source import ImageSource, as_source
from fm_ray.errors import UserError
from fm_ray.pool import add_into, partition
from fm_ray.pool.shard import BLOCK, PoolShard, ShardSpec, is_read_only, set_round

P = ParamSpec("P")
R = TypeVar("R")
PUT_BYTES = 64 * 1024  # arguments larger than this go through the object store once per call
RESOURCE_WAIT_S = float(os.environ.get("FM_RAY_RESOURCE_WAIT_S", "60"))


@dataclasses.dataclass(frozen=True)
class Answer:
    incarnation: str  # the answering actor's token
    ran: bool  # False: the caller expected another incarnation, nothing ran
    value: Any = None


def to_cpu(x: Any) -> Any:
    """Tensors (also inside tuples, lists, dicts and dataclasses) moved to the CPU for the wire."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, tuple | list):
        return type(x)(to_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: to_cpu(v) for k, v in x.items()}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: to_cpu(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init})
    return x


@ray.remote(max_restarts=-1, max_task_retries=0)
class ShardActor:
    """A `PoolShard` in an actor. Its data comes with `start` and with every call, as nested object
    refs ([spec, images, index_N], held by the pool), never as constructor arguments: Ray logs an
    error-level line for a restartable actor with constructor arguments in the object store
    (ray-project/ray#53727), and a restarted actor loads its shard again from the call's refs."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)
        self.incarnation = uuid.uuid4().hex  # new in every process Ray starts for this actor
        self.shard: PoolShard | None = None

    def _load(self, refs: list[Any]) -> None:
        if self.shard is None:
            spec, images, index_N = ray.get(refs)
            self.shard = PoolShard(spec, images, index_N)

    def start(self, refs: list[Any]) -> str:
        self._load(refs)
        return self.incarnation

    def token(self) -> str:
        return self.incarnation

    def call(self, expected: str, refs: list[Any], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Answer:
        if expected != self.incarnation:  # restarted since the pool last heard from us: state lost
            return Answer(self.incarnation, ran=False)
        self._load(refs)
        return Answer(self.incarnation, ran=True, value=to_cpu(fn(self.shard, *args, **kwargs)))

    def add(self, expected: str, a: Answer, b: Answer) -> Answer:
        """Two answers (Ray fetches them from the object store, shard to shard) added up: one step
        of the tree `RayPool.map_sum` reduces over; not run if either is from a lost incarnation."""
        if expected != self.incarnation or not (a.ran and b.ran):
            return Answer(self.incarnation, ran=False)
        return Answer(self.incarnation, ran=True, value=add_into(a.value, b.value))


@dataclasses.dataclass(frozen=True)
class _Call:
    """One `map` call as sent: arguments already on the CPU / in the object store."""

    fn: Callable[..., Any]
    args: tuple
    kwargs: dict[str, Any]

    def submit(self, actor: Any, expected: str, refs: list[Any]) -> Any:
        return actor.call.remote(expected, refs, self.fn, *self.args, **self.kwargs)


def _get(future: Any) -> Answer | None:
    """The answer, None if the actor died meanwhile; a shard's UserError is re-raised as itself."""
    try:
        return ray.get(future)
    except RayActorError:
        return None
    except RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise e.cause from None
        raise


class _Restarted(Exception):
    """A shard actor answered with a new incarnation (or died) while being replayed."""


def _gpus_per_shard(cfg: PoolConfig) -> float:
    """An explicit --gpus-per-shard, else an even share of the cluster's GPUs (at most one each).

    Inside a placement group (a Tune trial) only what the group reserved is usable: no GPUs
    unless asked for explicitly.
    """
    if cfg.gpus_per_shard is not None:
        return cfg.gpus_per_shard
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if gpus == 0 or ray.util.get_current_placement_group() is not None:
        return 0.0
    return min(1.0, gpus / cfg.shards)


def reserve(bundles: list[dict[str, float]], what: str, hint: str) -> PlacementGroup:
    """A placement group for `bundles`, or a UserError: at once when the cluster is too small in all,
    else after RESOURCE_WAIT_S without room (never a silent hang)."""
    need = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > have.get(k, 0.0)}
    if short:
        raise UserError(
            f"the Ray cluster cannot host {what}: needs {short}, has { {k: have.get(k, 0.0) for k in short} }: {hint}"
        )
    pg = placement_group(bundles, strategy="PACK")
    if not pg.wait(timeout_seconds=RESOURCE_WAIT_S):
        remove_placement_group(pg)
        raise UserError(
            f"no room on the Ray cluster for {what} ({bundles[0]} each) within {RESOURCE_WAIT_S:.0f}s: {hint}"
        )
    return pg


def _nbytes(a: Any) -> int:
    if isinstance(a, torch.Tensor):
        return a.numel() * a.element_size()
    if isinstance(a, np.ndarray):
        return a.nbytes
    if isinstance(a, dict):
        return sum(_nbytes(v) for v in a.values())
    if isinstance(a, tuple | list):
        return sum(_nbytes(v) for v in a)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return sum(_nbytes(getattr(a, f.name)) for f in dataclasses.fields(a))
    return 0


def _share(a: Any) -> Any:
    """On the CPU, and through the object store (once for all actors) when large."""
    a = to_cpu(a)
    return ray.put(a) if _nbytes(a) > PUT_BYTES else a


class RayPool:
    def __init__(self, cfg: PoolConfig, spec: ShardSpec, images: ImageSource | torch.Tensor):
        self._own_ray = not ray.is_initialized()
        if self._own_ray:  # address None: $RAY_ADDRESS if set, else a local instance for this run
            ray.init(
                address=cfg.ray_address, include_dashboard=False, log_to_driver=False, logging_level=ray_log_level()
            )
        cfg = dataclasses.replace(cfg, gpus_per_shard=_gpus_per_shard(cfg))
        device = "cuda" if cfg.gpus_per_shard else "cpu"
        spec = dataclasses.replace(spec, device=device)
        self._pg = self._reserve(cfg)
        threads = max(1, int(cfg.cpus_per_shard))
        self.actors = []
        self._images = []  # each shard's images (in _refs too): held so a restarted actor reloads them
        source = as_source(images)
        spec_ref = ray.put(spec)
        self._refs: list[list[Any]] = []  # per shard: [spec, images, index_N], what its actor loads
        for i, part in enumerate(partition(len(source), cfg.shards, BLOCK)):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i) if self._pg else None
            # in-RAM pixels, or for a Parquet pool a small descriptor the actor reads its rows with
            self._images.append(ray.put(source.subset(part)))
            self._refs.append([spec_ref, self._images[-1], ray.put(part)])
            actor = ShardActor.options(  # type: ignore[attr-defined]
                num_cpus=cfg.cpus_per_shard, num_gpus=cfg.gpus_per_shard, scheduling_strategy=strategy
            ).remote(threads)
            self.actors.append(actor)
        self.n_shards = len(self.actors)
        # the incarnation each actor last answered with (waits for the actors to start)
        self._incarnation: list[str] = self._wait_started()
        self._log: list[_Call] = []  # this round's state-changing calls, for replay
        self.restarts = 0
        self.received_bytes = 0  # tensor bytes of every answer the driver has received

    def _wait_started(self) -> list[str]:
        """Each actor's incarnation, once all have started and loaded their shard. A shard that
        cannot load (e.g. its Parquet rows cannot be read) says why now, as the one-line UserError
        it was, not at the first call."""
        try:
            return list(ray.get([a.start.remote(r) for a, r in zip(self.actors, self._refs, strict=True)]))
        except RayTaskError as e:
            if isinstance(e.cause, UserError):
                self.close()
                raise e.cause from None
            raise
        except RayActorError as e:
            if not e.actor_init_failed:
                raise
            self.close()
            prefix = f"{UserError.__module__}.{UserError.__qualname__}: "
            lines = [line for line in str(e).splitlines() if line.startswith(prefix)]
            if lines:
                raise UserError(lines[-1][len(prefix) :]) from None
            raise

    def _reserve(self, cfg: PoolConfig) -> PlacementGroup | None:
        """One bundle per shard; inside a Tune trial the trial's placement group already holds them."""
        if ray.util.get_current_placement_group() is not None:
            return None
        assert cfg.gpus_per_shard is not None  # resolved in __init__
        bundle = {"CPU": cfg.cpus_per_shard} | ({"GPU": cfg.gpus_per_shard} if cfg.gpus_per_shard else {})
        hint = "lower --shards, --cpus-per-shard or --gpus-per-shard, or join a larger cluster with --ray-address"
        return reserve([bundle] * cfg.shards, f"{cfg.shards} shards", hint)

    def map(self, fn: Callable[Concatenate[PoolShard, P], R], /, *args: P.args, **kwargs: P.kwargs) -> list[R]:
        if fn is set_round:
            self._log = []
        call = _Call(fn, tuple(_share(a) for a in args), {k: _share(v) for k, v in kwargs.items()})
        if not is_read_only(fn):
            self._log.append(call)
        futures = [
            call.submit(a, token, refs)
            for a, token, refs in zip(self.actors, self._incarnation, self._refs, strict=True)
        ]
        return self._answers(call, futures)

    def _answers(self, call: _Call, futures: list[Any]) -> list[Any]:
        """Each actor's answer to `call`; an actor that died or restarted is rejoined (replaying the
        round's calls before this one) and asked again."""
        results: list[Any] = []
        for i, fut in enumerate(futures):
            answer = _get(fut)
            while answer is None or not answer.ran:  # died during the call, or restarted before it
                self._rejoin(i, self._log if is_read_only(call.fn) else self._log[:-1])
                answer = _get(call.submit(self.actors[i], self._incarnation[i], self._refs[i]))
            self.received_bytes += _nbytes(answer.value)
            results.append(answer.value)
        return results

    def map_sum(self, fn: Callable[Concatenate[PoolShard, P], R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """The shards' answers added pairwise among the actors (a binary tree over the object store,
        in shard order), so the driver receives one sum instead of one answer per shard. If an
        actor dies or restarts meanwhile, the answers are gathered as `map` does and added here."""
        call = _Call(fn, tuple(_share(a) for a in args), {k: _share(v) for k, v in kwargs.items()})
        if not is_read_only(fn):
            self._log.append(call)
        futures = [
            call.submit(a, token, refs)
            for a, token, refs in zip(self.actors, self._incarnation, self._refs, strict=True)
        ]
        level = list(enumerate(futures))
        while len(level) > 1:
            pairs = [level[j : j + 2] for j in range(0, len(level), 2)]
            level = [
                (p[0][0], self.actors[p[0][0]].add.remote(self._incarnation[p[0][0]], p[0][1], p[1][1]))
                if len(p) == 2
                else p[0]
                for p in pairs
            ]
        try:
            root = _get(level[0][1])
        except RayTaskError:  # an argument lost with an actor that died: gather the answers instead
            root = None
        if root is not None and root.ran:
            self.received_bytes += _nbytes(root.value)
            return root.value
        answers = self._answers(call, futures)
        total = answers[0]
        for a in answers[1:]:
            total = add_into(total, a)
        return total

    def _rejoin(self, i: int, replay: list[_Call]) -> None:
        """Wait for Ray to restart shard i, then replay `replay` on it, as often as it dies meanwhile."""
        deadline = time.monotonic() + RESOURCE_WAIT_S
        while True:
            try:
                token = ray.get(self.actors[i].token.remote())
            except RayActorError:  # not restarted yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            if token != self._incarnation[i]:
                self.restarts += 1
                self._incarnation[i] = token
            try:
                for c in replay:
                    answer = _get(c.submit(self.actors[i], token, self._refs[i]))
                    if answer is None or not answer.ran:
                        raise _Restarted
                return
            except _Restarted:
                continue

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        if self._own_ray:
            ray.shutdown()
            self._own_ray = False
