"""The pool on Ray: one actor per shard wrapping the same `PoolShard` the local pool runs.

Ray is the transport only. Large arguments (model weights, masks) are `ray.put` once per call and
shared by every actor. A shard actor that dies is restarted by Ray; its state is rebuilt by
replaying this round's state-changing calls (they are deterministic), then the failed call is
re-issued, so the round completes with the same picks.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fm_ray.config import PoolConfig
from fm_ray.errors import UserError
from fm_ray.pool import partition
from fm_ray.pool.shard import BLOCK, PoolShard, ShardSpec
from fm_ray.pool.source import ImageSource, as_source

# Calls that change no shard state: never replayed after a restart.
READ_ONLY = frozenset({"top_scores", "fisher_diag_sum", "labeled_feats", "state_bytes", "pid"})
PUT_BYTES = 64 * 1024  # arguments larger than this go through the object store once per call
RESOURCE_WAIT_S = float(os.environ.get("FM_RAY_RESOURCE_WAIT_S", "60"))


@ray.remote(max_restarts=-1, max_task_retries=0)
class ShardActor:
    def __init__(self, spec: ShardSpec, images: ImageSource, index_N: np.ndarray, threads: int):
        torch.set_num_threads(threads)
        self.shard = PoolShard(spec, images, index_N)

    def call(self, method: str, *args: Any) -> Any:
        return os.getpid() if method == "pid" else getattr(self.shard, method)(*args)


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


def _nbytes(a: Any) -> int:
    if isinstance(a, torch.Tensor):
        return a.numel() * a.element_size()
    if isinstance(a, np.ndarray):
        return a.nbytes
    if isinstance(a, dict):
        return sum(_nbytes(v) for v in a.values())
    return 0


class RayPool:
    def __init__(self, cfg: PoolConfig, spec: ShardSpec, images: ImageSource | torch.Tensor):
        self._own_ray = not ray.is_initialized()
        if self._own_ray:  # address None: $RAY_ADDRESS if set, else a local instance for this run
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)
        cfg = dataclasses.replace(cfg, gpus_per_shard=_gpus_per_shard(cfg))
        device = "cuda" if cfg.gpus_per_shard else "cpu"
        spec = dataclasses.replace(spec, device=device)
        self._pg = self._reserve(cfg)
        threads = max(1, int(cfg.cpus_per_shard))
        self.actors = []
        self._images = []  # held so a restarted actor can re-read its constructor arguments
        source = as_source(images)
        for i, part in enumerate(partition(len(source), cfg.shards, BLOCK)):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i) if self._pg else None
            # in-RAM pixels, or for a Parquet pool a small descriptor the actor reads its rows with
            self._images.append(ray.put(source.subset(part)))
            actor = ShardActor.options(
                num_cpus=cfg.cpus_per_shard, num_gpus=cfg.gpus_per_shard, scheduling_strategy=strategy
            ).remote(spec, self._images[-1], part, threads)
            self.actors.append(actor)
        self.n_shards = len(self.actors)
        self._log: list[tuple[str, tuple]] = []  # this round's state-changing calls, for replay
        self.restarts = 0
        self._wait_started()

    def _wait_started(self) -> None:
        """Ray does not restart an actor whose constructor raised (e.g. its Parquet rows cannot be
        read): say why now, as the one-line UserError it was, not as a dead actor at the first call."""
        try:
            ray.get([a.call.remote("pid") for a in self.actors])
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
        need = {"CPU": cfg.cpus_per_shard * cfg.shards, "GPU": cfg.gpus_per_shard * cfg.shards}
        have = ray.cluster_resources()
        short = {k: v for k, v in need.items() if v > have.get(k, 0.0)}
        hint = "lower --shards, --cpus-per-shard or --gpus-per-shard, or join a larger cluster with --ray-address"
        if short:
            raise UserError(
                f"the Ray cluster cannot host {cfg.shards} shards: needs {short}, has "
                f"{ {k: have.get(k, 0.0) for k in short} }: {hint}"
            )
        bundle = {"CPU": cfg.cpus_per_shard} | ({"GPU": cfg.gpus_per_shard} if cfg.gpus_per_shard else {})
        pg = placement_group([bundle] * cfg.shards, strategy="PACK")
        if not pg.wait(timeout_seconds=RESOURCE_WAIT_S):
            remove_placement_group(pg)
            raise UserError(
                f"no room on the Ray cluster for {cfg.shards} x {bundle} within {RESOURCE_WAIT_S:.0f}s: {hint}"
            )
        return pg

    def map(self, method: str, *args: Any) -> list[Any]:
        if method == "set_round":
            self._log = []
        shared = tuple(ray.put(a) if _nbytes(a) > PUT_BYTES else a for a in args)
        if method not in READ_ONLY:
            self._log.append((method, shared))
        futures = [a.call.remote(method, *shared) for a in self.actors]
        results: list[Any] = []
        for i, fut in enumerate(futures):
            try:
                results.append(ray.get(fut))
            except RayActorError:
                results.append(self._recover(i, method, shared))
        return results

    def _recover(self, i: int, method: str, args: tuple) -> Any:
        """Wait for Ray to restart shard i, replay this round's calls, then re-issue the failed one."""
        self.restarts += 1
        deadline = time.monotonic() + RESOURCE_WAIT_S
        while True:
            try:
                ray.get(self.actors[i].call.remote("pid"))
                break
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        replay = self._log if method in READ_ONLY else self._log[:-1]
        for m, a in replay:
            ray.get(self.actors[i].call.remote(m, *a))
        return ray.get(self.actors[i].call.remote(method, *args))

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
