"""The pool on Ray: one actor per shard wrapping the same `PoolShard` the local pool runs.

Ray is the transport only. Actors are created from one plain value (their thread count) and
sent their images by a `build` call, again after every restart, so no constructor argument lives
in the object store (ray-project/ray#53727). Large arguments (model weights, masks, a greedy step's factors) are
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

from fm_ray._internal.procenv import compute_env
from fm_ray._internal.ray_session import init_kwargs, init_ray, ray_log_level, reachable_or_die
from fm_ray.config import PoolConfig
from fm_ray.data.source import ImageSource, as_source
from fm_ray.errors import UserError
from fm_ray.pool import add_into, shard_parts
from fm_ray.pool.shard import BLOCK, PoolShard, ShardSpec, is_read_only, peak_rss_mb, set_round

P = ParamSpec("P")
R = TypeVar("R")
PUT_BYTES = 64 * 1024  # arguments larger than this go through the object store once per call
RESOURCE_WAIT_S = float(os.environ.get("FM_RAY_RESOURCE_WAIT_S", "60"))


@dataclasses.dataclass(frozen=True)
class Answer:
    incarnation: str  # the answering actor's token
    ran: bool  # False: the caller expected another incarnation, nothing ran
    value: Any = None
    peak_rss_mb: float = 0.0  # the actor process's peak resident memory so far


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
    """Constructed from one small plain value, so a restart needs nothing from the object store
    (ray-project/ray#53727); the pool sends the shard's images with `build` (and again after a restart)."""

    def __init__(self, threads: int):
        torch.set_num_threads(threads)
        self.incarnation = uuid.uuid4().hex  # new in every process Ray starts for this actor
        self.shard: PoolShard | None = None

    def token(self) -> str:
        return self.incarnation

    def build(self, expected: str, spec: ShardSpec, images: ImageSource, index_N: np.ndarray) -> Answer:
        if expected != self.incarnation:
            return Answer(self.incarnation, ran=False)
        self.shard = PoolShard(spec, images, index_N)
        return Answer(self.incarnation, ran=True, peak_rss_mb=peak_rss_mb())

    def call(self, expected: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Answer:
        if expected != self.incarnation:  # restarted since the pool last heard from us: state lost
            return Answer(self.incarnation, ran=False)
        value = to_cpu(fn(self.shard, *args, **kwargs))
        return Answer(self.incarnation, ran=True, value=value, peak_rss_mb=peak_rss_mb())

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

    def submit(self, actor: Any, expected: str) -> Any:
        return actor.call.remote(expected, self.fn, *self.args, **self.kwargs)


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
            reachable_or_die(cfg.ray_address)
            kwargs = init_kwargs(cfg.ray_address)
            init_ray(
                address=cfg.ray_address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=ray_log_level(),
                **kwargs,  # type: ignore[arg-type]
            )
        source = as_source(images)
        parts = shard_parts(len(source), cfg.shards, BLOCK)  # a small pool: fewer shards, never an empty one
        cfg = dataclasses.replace(cfg, shards=len(parts))
        cfg = dataclasses.replace(cfg, gpus_per_shard=_gpus_per_shard(cfg))
        device = "cuda" if cfg.gpus_per_shard else "cpu"
        spec = dataclasses.replace(spec, device=device)
        self._pg = self._reserve(cfg)
        threads = max(1, int(cfg.cpus_per_shard))
        self.actors = []
        for i in range(len(parts)):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i) if self._pg else None
            # one small plain value: a restart needs nothing from the object store (ray-project/ray#53727)
            actor = ShardActor.options(  # type: ignore[attr-defined]
                num_cpus=cfg.cpus_per_shard,
                num_gpus=cfg.gpus_per_shard,
                scheduling_strategy=strategy,
                runtime_env={"env_vars": compute_env()},  # merged with the job's (FM_RAY_*)
            ).remote(threads)
            self.actors.append(actor)
        self.n_shards = len(self.actors)
        self._spec, self._source, self._parts = spec, source, parts
        self._log: list[_Call] = []  # this round's state-changing calls, for replay
        self.restarts = 0
        self.received_bytes = 0  # tensor bytes of every answer the driver has received
        self.peak_rss_mb = [0.0] * self.n_shards  # each shard's peak RSS as last reported
        # the incarnation each actor last answered with (waits for the actors to start)
        self._incarnation: list[str] = list(ray.get([a.token.remote() for a in self.actors]))
        try:
            self._build_all()
        except BaseException:
            self.close()
            raise

    def _build(self, i: int, token: str) -> Any:
        """Shard i's images by value (in-RAM pixels, or a Parquet pool's small descriptor the actor
        reads its rows with), sent from the driver each time: nothing a restart needs is stored."""
        return self.actors[i].build.remote(token, self._spec, self._source.subset(self._parts[i]), self._parts[i])

    def _build_all(self) -> None:
        futures = [self._build(i, token) for i, token in enumerate(self._incarnation)]
        for i, fut in enumerate(futures):
            answer = _get(fut)
            if answer is None or not answer.ran:
                self._rejoin(i, [])
            else:
                self.peak_rss_mb[i] = max(self.peak_rss_mb[i], answer.peak_rss_mb)

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
        futures = [call.submit(a, token) for a, token in zip(self.actors, self._incarnation, strict=True)]
        return self._answers(call, futures)

    def _answers(self, call: _Call, futures: list[Any]) -> list[Any]:
        """Each actor's answer to `call`; an actor that died or restarted is rejoined (replaying the
        round's calls before this one) and asked again."""
        results: list[Any] = []
        for i, fut in enumerate(futures):
            answer = _get(fut)
            while answer is None or not answer.ran:  # died during the call, or restarted before it
                self._rejoin(i, self._log if is_read_only(call.fn) else self._log[:-1])
                answer = _get(call.submit(self.actors[i], self._incarnation[i]))
            self.received_bytes += _nbytes(answer.value)
            self.peak_rss_mb[i] = max(self.peak_rss_mb[i], answer.peak_rss_mb)
            results.append(answer.value)
        return results

    def map_sum(self, fn: Callable[Concatenate[PoolShard, P], R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """The shards' answers added pairwise among the actors (a binary tree over the object store,
        in shard order), so the driver receives one sum instead of one answer per shard. If an
        actor dies or restarts meanwhile, the answers are gathered as `map` does and added here."""
        call = _Call(fn, tuple(_share(a) for a in args), {k: _share(v) for k, v in kwargs.items()})
        if not is_read_only(fn):
            self._log.append(call)
        futures = [call.submit(a, token) for a, token in zip(self.actors, self._incarnation, strict=True)]
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
        """Wait for Ray to restart shard i, then rebuild it and replay `replay` on it, as often as
        it dies meanwhile; one UserError if it does not come back within RESOURCE_WAIT_S."""
        deadline = time.monotonic() + RESOURCE_WAIT_S
        while True:
            try:
                token = ray.get(self.actors[i].token.remote())
            except RayActorError:  # not restarted yet (ActorUnavailableError, ActorDiedError)
                if time.monotonic() > deadline:
                    raise self._lost(i) from None
                time.sleep(0.2)
                continue
            if token != self._incarnation[i]:
                self.restarts += 1
                self._incarnation[i] = token
            try:
                answer = _get(self._build(i, token))
                if answer is None or not answer.ran:
                    raise _Restarted
                for c in replay:
                    answer = _get(c.submit(self.actors[i], token))
                    if answer is None or not answer.ran:
                        raise _Restarted
                return
            except _Restarted:
                continue

    def _lost(self, i: int) -> UserError:
        part = self._parts[i]
        return UserError(
            f"shard {i} (pool positions {part[0]}..{part[-1]}) died and could not be restarted within "
            f"{RESOURCE_WAIT_S:.0f}s; likely cause: out of memory (its peak RSS so far: {self.peak_rss_mb[i]:.0f} MB): "
            "give the shard more memory (a larger node, --cpus-per-shard) or fewer samples (more --shards, "
            "--embed-dtype bfloat16), then rerun with --resume"
        )

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
