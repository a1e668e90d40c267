"""`fm-ray run --driver-gpus N --driver-cpus M`: the recipe in a Ray task placed where those resources are.

`ray job submit -- fm-ray run ...` starts `fm-ray` on the head node, which has no GPU in
clusters/aws-gpu.yaml: training, evaluation and the d x d reduce would run on its CPU. With these
flags `fm-ray` itself only checks the input and opens --out (the same refusals and --resume checks
as without them), then runs `run_experiment` in a task holding N GPUs and M CPUs, wherever Ray
finds them. The task works in a node-local run dir and streams back its progress lines and, after
every finished round, the run dir's files, which `fm-ray` writes into --out on its own machine: the
same files and rows as a run without the flags, and Ctrl+C keeps every finished round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, cast

import pyarrow.parquet as pq
import ray
import torch
from ray import ObjectRefGenerator
from ray.exceptions import RayTaskError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fm_ray._internal.files import write_atomically
from fm_ray._internal.log import LOGGER, log
from fm_ray.config import RunConfig, from_dict, resolve_backend, to_dict, with_resolved_backend
from fm_ray.errors import UserError
from fm_ray.pool.ray_pool import reserve
from fm_ray.run.rundir import RunDir


def run_files(rundir: RunDir) -> list[Path]:
    """A run dir's durable state, in the order a round writes it (queries, stop-set predictions, rows,
    then weights)."""
    return [rundir.config_path, rundir.queries_path, rundir.stop_preds_path, rundir.rounds_path, *rundir.checkpoints()]


def read_files(rundir: RunDir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_files(rundir) if p.exists()}


def write_files(rundir: RunDir, files: dict[str, bytes]) -> None:
    """Write what `read_files` read in the task, in its order, each atomically as RunDir's own writes
    (a crash leaves the previous round); then drop checkpoints the task no longer has."""
    for name, data in files.items():
        path = rundir.path / Path(name).name  # names only: nothing lands outside the run dir
        write_atomically(path, _writer(data))
    for old in rundir.checkpoints():
        if old.name not in files:
            old.unlink(missing_ok=True)


def _writer(data: bytes) -> Callable[[IO[bytes]], object]:
    return lambda f: f.write(data)


class _Lines(logging.Handler):
    """Hands each fm_ray log message of the task to `emit_line` (the driver logs it again, with its
    own format and level, so `fm-ray -q` and `-v` govern the task's lines too)."""

    def __init__(self, emit_line: Callable[[str], None]):
        super().__init__()
        self._emit_line = emit_line

    def emit(self, record: logging.LogRecord) -> None:
        self._emit_line(record.getMessage())


# A task, not an actor: an idle worker that already imported torch and fm_ray is reused, and a
# generator task streams its items as they come. Never retried: a rerun would repeat rounds.
@ray.remote(max_retries=0)
def drive(
    cfg_dict: dict[str, Any], files: dict[str, bytes], threads: int, level: int = logging.INFO
) -> Iterator[tuple[str, Any]]:
    """Runs one experiment in a temp run dir seeded with `files`; yields ("line", text) per fm_ray
    log message at `level` or above and ("files", {name: bytes}) per finished round."""
    from fm_ray.run.recipe import run_experiment

    torch.set_num_threads(threads)  # as OMP_NUM_THREADS=<cpus> fm-ray run: same float sums
    items: queue.Queue[tuple[str, Any]] = queue.Queue()
    with tempfile.TemporaryDirectory(prefix="fm_ray_driver_") as d:
        rundir = RunDir(d)
        write_files(rundir, files)

        def work() -> None:
            lines = _Lines(lambda line: items.put(("line", line)))
            propagate = LOGGER.propagate
            LOGGER.addHandler(lines)
            LOGGER.setLevel(level)  # a reused worker: set, not inherited from the last task
            LOGGER.propagate = False  # the lines reach the driver once, through `items`
            try:
                run_experiment(
                    from_dict(cfg_dict),
                    d,
                    resume=True,
                    on_round=lambda row: items.put(("files", read_files(rundir))),
                )
                items.put(("done", None))
            except BaseException as e:  # handed to the generator, which raises it to the caller
                items.put(("error", e))
            finally:
                LOGGER.removeHandler(lines)
                LOGGER.propagate = propagate

        threading.Thread(target=work, daemon=True).start()
        while True:
            kind, payload = items.get()
            if kind == "error":
                raise payload
            if kind == "done":
                return
            yield kind, payload


def _beside_driver(cfg: RunConfig, driver_gpus: float) -> RunConfig:
    """Shard actors' default GPU share counts only the GPUs the driver leaves free (pool options
    are not part of run_id, so results do not change)."""
    if resolve_backend(cfg.pool) != "ray" or cfg.pool.gpus_per_shard is not None:
        return cfg
    free = max(0.0, ray.cluster_resources().get("GPU", 0.0) - driver_gpus)
    share = min(1.0, free / cfg.pool.shards)
    return dataclasses.replace(cfg, pool=dataclasses.replace(cfg.pool, gpus_per_shard=share))


def _wait_ended(items: Any) -> None:
    """Block until the cancelled task has ended, so its CPUs and GPUs are free when we return."""
    # it raises once cancelled (a second Ctrl+C ends the wait too): either way nothing more to wait for
    with contextlib.suppress(ray.exceptions.RayError, KeyboardInterrupt):
        ray.get(items.completed())


def run_remote(
    cfg: RunConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    on_line: Callable[[str], None] = log,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """`run_experiment(cfg, out, resume, overwrite)` in a Ray task holding cfg.pool.driver_cpus/_gpus.

    Raises:
        UserError: bad input (before Ray starts, or from inside the task, as one line), or the
            cluster cannot host the driver.
        KeyboardInterrupt: after stopping the task (and with it its shard actors); --out keeps
            every finished round, so `--resume` continues.
    """
    from fm_ray._internal.ray_session import ensure_ray
    from fm_ray.run.validate import check

    check(cfg)  # bad input fails here, before Ray starts
    cfg = with_resolved_backend(cfg)  # by this shell's $RAY_ADDRESS, not the task's
    rundir = RunDir(out)
    rundir.open(cfg, resume, overwrite)  # same refusals as a local run; the task then always resumes
    cpus = cfg.pool.driver_cpus if cfg.pool.driver_cpus is not None else 1.0
    gpus = cfg.pool.driver_gpus or 0.0
    started = ensure_ray(cfg.pool.ray_address)
    pg = items = None
    finished = False
    try:
        bundle = {"CPU": cpus} | ({"GPU": gpus} if gpus else {})
        hint = "lower --driver-cpus / --driver-gpus, or join a cluster with such a node with --ray-address"
        pg = reserve([bundle], "the driver", hint)
        cfg = _beside_driver(cfg, gpus)
        placed = drive.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(pg))
        level = LOGGER.getEffectiveLevel()
        # a generator task's .remote() gives an ObjectRefGenerator (ray's stubs say one ObjectRef)
        items = cast(ObjectRefGenerator, placed.remote(to_dict(cfg), read_files(rundir), max(1, int(cpus)), level))
        try:
            for ref in items:
                kind, payload = ray.get(ref)
                if kind == "line":
                    on_line(payload)
                else:
                    write_files(rundir, payload)
                    if on_round is not None:  # e.g. MLflow, which lives here, not in the task
                        on_round(pq.read_table(rundir.rounds_path).to_pylist()[-1])
        except RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise UserError(str(e.cause)) from None  # one line, not the remote traceback
            raise
        finished = True
        return rundir.path
    finally:
        if items is not None and not finished:
            ray.cancel(items, force=True)  # Ctrl+C or error: kill the run's worker; its shard actors die with it
            _wait_ended(items)
        if pg is not None:
            remove_placement_group(pg)
        if started:
            ray.shutdown()
