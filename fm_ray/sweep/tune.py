"""`fm-ray sweep`: a grid of active-learning runs as Ray Tune trials, resumable, one Parquet dataset.

Each trial is one `run_experiment` call (the same recipe as `fm-ray run`). It reports to Tune after
every round, with a Tune `Checkpoint` holding the run directory (config.json + per-round Parquet),
so a restored trial continues after its last finished round. Finished trials are never rerun.

A sweep directory (`--out`, a local path or an s3:// / gs:// URI used as Tune's storage_path):

    sweep.json                                   the expanded grid: one RunConfig per trial
    results/rounds/dataset=<d>/setting=<s>/<run_id>.parquet    round rows (hive-partitioned)
    results/queries/dataset=<d>/setting=<s>/<run_id>.parquet   queried samples
    results/configs/<run_id>.json                each trial's config
    runs/<run_id>/                               each trial's run dir (local --out only; else node-local temp)
    tune/                                        Tune's experiment state, trial dirs and checkpoints

Examples:
    fm-ray sweep --out sweeps/a --strategies random,entropy,fishermask --seeds 0,1,2 --preset s2 --epochs 5
    fm-ray sweep --out s3://bucket/sweeps/b --spec sweep.yaml --ray-address auto --max-concurrent 8
    fm-ray sweep --out sweeps/c --preset cpu-paper-fmnist-s2      # a sweep preset (grid.SWEEP_PRESETS)
    fm-ray sweep --out sweeps/a --resume                             # after Ctrl+C, a crash or failed trials
    fm-ray report sweeps/a

Determinism: a trial computes the same rows as `fm-ray run` with the same flags. On CPU, torch's
float sums depend on its thread count, and Ray gives a trial `--cpus-per-trial` threads
(OMP_NUM_THREADS): reproduce a trial bit for bit with `OMP_NUM_THREADS=<cpus per trial> fm-ray run ...`.
Remote --out (s3://, gs://): every node needs the credentials; run dirs then live in node-local temp
dirs and a restored trial rebuilds its run dir from its latest Tune checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fm_ray._internal.files import write_bytes_atomically
from fm_ray._internal.log import log
from fm_ray._internal.ray_session import ensure_ray
from fm_ray.config import RunConfig, from_dict, resolve_backend, to_dict, with_resolved_backend
from fm_ray.errors import UserError
from fm_ray.run.rundir import PARTITIONS, ROUND_SCHEMA, SWEEP_QUERY_SCHEMA, RunDir, run_id
from fm_ray.sweep.grid import SWEEP_KEYS, SweepOptions

EXPERIMENT = "tune"  # Tune's experiment name, under --out
METRICS = ("round", "n_labeled", "accuracy", "balanced_accuracy", "train_seconds", "query_seconds")

# ---------------------------------------------------------------------------------------------
# Storage: the sweep root on a local disk or a pyarrow filesystem (s3://, gs://).


def _is_uri(out: str | Path) -> bool:
    return "://" in str(out)


def storage_root(out: str | Path) -> str:
    return str(out).rstrip("/") if _is_uri(out) else str(Path(out).resolve())


def _fs(root: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(root)


def _write_bytes(root: str, rel: str, data: bytes) -> None:
    fs, base = _fs(root)
    write_bytes_atomically(fs, f"{base}/{rel}", data)  # a reader never sees half a file


def _write_table(root: str, rel: str, rows: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema).drop_columns(
        [c for c in PARTITIONS if c in schema.names]
    )  # hive: partition values live in the path, not the file
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _write_bytes(root, rel, sink.getvalue().to_pybytes())


def partition_dir(cfg: RunConfig) -> str:
    return "/".join(f"{k}={quote(getattr(cfg.data, k), safe='')}" for k in PARTITIONS)


def publish(root: str, rundir: Path, cfg: RunConfig) -> None:
    """Copy a run directory's rows and queries into the sweep's partitioned results dataset, named by
    the id the run directory holds (a run created before the identity rule changed keeps its old one)."""
    rid, part = RunDir(rundir).stored_run_id() or run_id(cfg), partition_dir(cfg)
    rows = pq.read_table(rundir / "rounds.parquet").to_pylist()
    queries = pq.read_table(rundir / "queries.parquet").to_pylist()
    queries = [{**q, "dataset": cfg.data.dataset, "setting": cfg.data.setting} for q in queries]
    _write_table(root, f"results/queries/{part}/{rid}.parquet", queries, SWEEP_QUERY_SCHEMA)
    _write_table(root, f"results/rounds/{part}/{rid}.parquet", rows, ROUND_SCHEMA)
    config = json.dumps({"run_id": rid, "config": to_dict(cfg)}, indent=2)
    _write_bytes(root, f"results/configs/{rid}.json", config.encode())


def local_run_dir(root: str, rid: str) -> Path:
    if not _is_uri(root):
        return Path(root) / "runs" / rid
    tag = hashlib.sha1(root.encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / "fm_ray_runs" / tag / rid


# ---------------------------------------------------------------------------------------------
# The Tune trial: one active-learning run, a report and a checkpoint per round.


def _n_rows(path: Path) -> int:
    return pq.read_metadata(path).num_rows if path.exists() else 0


def _restore(checkpoint: Any, rundir: Path) -> None:
    """Bring the run dir up to the checkpoint, unless the run dir is already at or past it."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as d:
        if _n_rows(Path(d) / "rounds.parquet") > _n_rows(rundir / "rounds.parquet"):
            rundir.mkdir(parents=True, exist_ok=True)
            for f in Path(d).iterdir():
                shutil.copy2(f, rundir / f.name)


def _snapshot(rundir: Path, warm_start: bool) -> Path:
    """A copy of the run dir's durable state for a Tune checkpoint (weights only if the next round needs them)."""
    d = Path(tempfile.mkdtemp(prefix="fm_ray_ckpt_"))
    run = RunDir(rundir)
    paths = [run.config_path, run.rounds_path, run.queries_path] + (run.checkpoints() if warm_start else [])
    for path in paths:
        if path.exists():
            shutil.copy2(path, d / path.name)
    return d


def trial(config: dict[str, Any]) -> None:
    """Tune trainable: `run_experiment` on the trial's config, resumed from its run dir / checkpoint."""
    from ray import tune

    from fm_ray.run.recipe import run_experiment

    cfg, root = from_dict(config["cfg"]), config["root"]
    rundir = local_run_dir(root, run_id(cfg))
    _restore(tune.get_checkpoint(), rundir)

    def report(row: dict[str, Any]) -> None:
        publish(root, rundir, cfg)
        snap = _snapshot(rundir, cfg.train.warm_start)
        try:
            metrics = {k: row[k] for k in METRICS} | {"run_id": row["run_id"]}
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(snap)))
        finally:
            shutil.rmtree(snap, ignore_errors=True)

    reported: list[int] = []

    def on_round(row: dict[str, Any]) -> None:
        report(row)
        reported.append(row["round"])

    run_experiment(cfg, rundir, resume=RunDir(rundir).config_path.exists(), on_round=on_round)
    if not reported:  # everything was already done (e.g. the run dir outlived Tune's state)
        report(pq.read_table(rundir / "rounds.parquet").to_pylist()[-1])


# ---------------------------------------------------------------------------------------------
# The driver.


def trial_resources(cfg: dict[str, Any], cpus: float, gpus: float) -> Any:
    """One bundle for the trial driver + one per Ray shard actor, so a full cluster queues trials."""
    from ray import tune

    def bundle(c: float, g: float) -> dict[str, float]:
        return {"CPU": c, **({"GPU": g} if g > 0 else {})}

    pool = cfg["cfg"]["pool"]
    shards = pool["shards"] if resolve_backend(from_dict(cfg["cfg"]).pool) == "ray" else 0
    return tune.PlacementGroupFactory(
        [bundle(cpus, gpus)] + [bundle(pool["cpus_per_shard"], pool["gpus_per_shard"] or 0.0)] * shards
    )


def check_fits(configs: list[RunConfig], opts: SweepOptions, fixed: bool) -> None:
    """A trial bigger than the whole cluster would wait forever: an error on a fixed (local) Ray
    instance, a warning on a cluster that may still scale up."""
    import ray

    have = ray.cluster_resources()
    for cfg in configs:
        pgf = trial_resources({"cfg": to_dict(cfg)}, opts.cpus_per_trial, opts.gpus_per_trial)
        need = {k: sum(b.get(k, 0.0) for b in pgf.bundles) for k in ("CPU", "GPU")}
        short = {k: v for k, v in need.items() if v > have.get(k, 0.0)}
        if short:
            msg = (
                f"trial {run_id(cfg)} needs {short} (driver + {cfg.pool.shards if resolve_backend(cfg.pool) == 'ray' else 0} "
                f"shard actors) but the Ray cluster has { {k: have.get(k, 0.0) for k in short} }: lower "
                "--shards / --cpus-per-shard / --cpus-per-trial, use --backend local, or join a larger cluster"
            )
            if fixed:
                raise UserError(msg)
            log(f"sweep: {msg}; it waits until the cluster scales up", logging.WARNING)
            return


class Progress:
    """A concise progress line per result: trials done/running/errored and the latest accuracy."""

    def __init__(self, total: int):
        self.total = total

    def line(self, trials: list[Any], trial: Any, result: dict[str, Any] | None, event: str) -> str:
        # Tune calls on_trial_complete/_error before it updates the trial's status: count it as it ends
        ending = {"finished": "TERMINATED"}.get(event, "ERROR" if event.startswith("failed") else None)
        states = [ending if ending and t is trial else t.status for t in trials]
        head = (
            f"sweep: {states.count('TERMINATED')}/{self.total} done, "
            f"{states.count('RUNNING')} running, {states.count('ERROR')} errored"
        )
        name = run_id(from_dict(trial.config["cfg"])) if "cfg" in trial.config else str(trial)
        if result is not None and "accuracy" in result:
            return f"{head} | {name} round {result['round']}: acc {result['accuracy']:.4f}"
        return f"{head} | {name} {event}"


def trial_error(trial: Any) -> str:
    """A failed trial's cause in one line: the last line of the error Tune stored (`DegenerateModelError:
    round 0: ...`), and where its whole traceback is; Tune's own traceback print is off (run_sweep)."""
    text, where = "", getattr(trial, "error_file", None)  # written here before Tune calls back; synced later
    if where:
        with contextlib.suppress(OSError):
            text = Path(where).read_text(errors="replace")
    last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    last = re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=\w+:)", "", last)  # fm_ray.errors.UserError: -> UserError:
    last = last if len(last) <= 300 else last[:297] + "..."
    return "; ".join(part for part in (last, f"details in {where}" if where else "") if part) or "no error recorded"


def _progress_callback(total: int) -> Any:
    from ray import tune

    progress = Progress(total)

    class _Callback(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            log(progress.line(trials, trial, result, "result"))

        def on_trial_complete(self, iteration, trials, trial, **info):
            log(progress.line(trials, trial, None, "finished"))

        def on_trial_error(self, iteration, trials, trial, **info):
            log(
                progress.line(trials, trial, None, f"failed: {trial_error(trial)} (resume with --resume)"),
                logging.ERROR,
            )

    return _Callback()


def run_sweep(
    configs: list[RunConfig],
    opts: SweepOptions,
    callbacks: Sequence[Any] = (),
    ray_address: str | None = None,
) -> Any:
    """Run (or with `opts.resume`, continue) the sweep; returns Tune's ResultGrid.

    Raises:
        UserError: --out already holds a sweep and --resume is missing, or --resume finds none, or
            the flags given with --resume describe a different grid.
    """
    # num_to_keep forces a state snapshot per checkpoint; cheap here (small files), so no warning
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's console output (its experiment banner and tables, printed even at verbose=0 by its new
    # output engine) gives way to fm_ray's progress lines (_progress_callback)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # a failed trial is one fm_ray line naming its cause and its error file (trial_error), not Tune's
    # traceback on stderr: a trial's DegenerateModelError is the user's run, not a bug
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    configs = [with_resolved_backend(c) for c in configs]  # here, not in each trial's worker
    root = storage_root(opts.out)
    started = ensure_ray(ray_address, log_to_driver=False)  # trials report through the callback
    try:
        check_fits(configs, opts, fixed=started)
        if _holds_sweep(root, opts):
            tuner, total = _restored_tuner(root, configs, opts)
        else:
            tuner, total = _new_tuner(root, configs, opts, callbacks)
        log(f"sweep: {total} trials -> {opts.out}")
        results = tuner.fit()
        failed = sum(results[i].error is not None for i in range(len(results)))  # ResultGrid: no __iter__ stub
        if failed:
            log(f"sweep: {failed} trial(s) failed; continue with `fm-ray sweep --out {opts.out} --resume`")
        return results
    finally:
        if started:
            import ray

            ray.shutdown()


def _holds_sweep(root: str, opts: SweepOptions) -> bool:
    """Whether --out holds a sweep to continue; one there without --resume (or none with it) is an error."""
    from ray import tune

    exists = bool(tune.Tuner.can_restore(f"{root}/{EXPERIMENT}"))
    if opts.resume and not exists:
        raise UserError(f"--resume: no sweep to continue in {opts.out}: drop --resume to start one there")
    if exists and not opts.resume:
        raise UserError(f"{opts.out} already holds a sweep: pass --resume to continue it, or another --out")
    return exists


def _restored_tuner(root: str, configs: list[RunConfig], opts: SweepOptions) -> tuple[Any, int]:
    """The stored sweep's tuner (unfinished and errored trials go on), and its number of trials."""
    from ray import tune

    sweep = _read_sweep(root)
    stored = {run_id(from_dict(c)) for c in sweep["configs"]}
    if configs and {run_id(c) for c in configs} != stored:
        raise UserError(
            f"--resume: the grid given differs from the sweep in {opts.out}: "
            "pass only --out and --resume (plus the same grid flags)"
        )
    trainable = _trainable(sweep["options"])
    tuner = tune.Tuner.restore(f"{root}/{EXPERIMENT}", trainable, resume_unfinished=True, resume_errored=True)
    return tuner, len(stored)


def _new_tuner(root: str, configs: list[RunConfig], opts: SweepOptions, callbacks: Sequence[Any]) -> tuple[Any, int]:
    """A tuner over the grid, one trial per config; the grid and the options go to sweep.json first."""
    from ray import tune

    if not configs:
        raise UserError("the sweep grid is empty: give --strategies/--seeds/... or --spec or --preset")
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k in SWEEP_KEYS}
    sweep = {"configs": [to_dict(c) for c in configs], "options": options}
    _write_bytes(root, "sweep.json", json.dumps(sweep, indent=1).encode())
    tuner = tune.Tuner(
        _trainable(options),
        param_space={"cfg": tune.grid_search([to_dict(c) for c in configs]), "root": root},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=opts.max_concurrent,
            trial_dirname_creator=lambda t: run_id(from_dict(t.config["cfg"])),
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=root,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[_progress_callback(len(configs)), *callbacks],
            verbose=0,
        ),
    )
    return tuner, len(configs)


def _trainable(options: dict[str, Any]) -> Callable[..., Any]:
    from ray import tune

    cpus, gpus = options.get("cpus_per_trial") or 1.0, options.get("gpus_per_trial") or 0.0
    return tune.with_resources(trial, lambda config: trial_resources(config, cpus, gpus))


def _read_sweep(root: str) -> dict[str, Any]:
    fs, base = _fs(root)
    try:
        with fs.open_input_stream(f"{base}/sweep.json") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        raise UserError(
            f"{root}/sweep.json is missing or unreadable: start the sweep afresh in another --out"
        ) from None
