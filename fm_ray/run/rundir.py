"""A run directory: config.json, rounds.parquet and queries.parquet, rewritten atomically per round."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fm_ray._internal.files import check_folder_target, write_atomically
from fm_ray._internal.log import log
from fm_ray._internal.paths import safe_name
from fm_ray.config import RunConfig, from_dict, to_dict
from fm_ray.core.stopping import CRITERIA
from fm_ray.errors import UserError

_PROFILE = pa.struct([("name", pa.string()), ("numel", pa.int64()), ("kept", pa.int64()), ("fraction", pa.float64())])
ROUND_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("dataset", pa.string()),
        ("setting", pa.string()),
        ("strategy", pa.string()),
        ("model", pa.string()),
        ("seed", pa.int64()),
        ("round", pa.int64()),
        ("n_labeled", pa.int64()),
        ("accuracy", pa.float64()),
        ("balanced_accuracy", pa.float64()),
        ("per_class_accuracy", pa.list_(pa.float64())),
        ("classes", pa.list_(pa.int64())),
        ("n_queried", pa.int64()),
        ("queried_class_counts", pa.list_(pa.int64())),
        ("train_epochs", pa.int64()),
        ("train_accuracy", pa.float64()),
        ("train_seconds", pa.float64()),
        ("eval_seconds", pa.float64()),
        ("query_seconds", pa.float64()),
        ("forward_seconds", pa.float64()),  # the query's forward pass over every pool sample (predictions)
        ("mask_seconds", pa.float64()),
        ("embed_seconds", pa.float64()),  # Fisher embeddings and their partial sums, reduce included
        ("reduce_seconds", pa.float64()),  # adding the shards' d x d partial sums on the driver
        ("select_seconds", pa.float64()),
        ("mask_size", pa.int64()),
        ("mask_profile", pa.list_(_PROFILE)),
        ("selection_state_bytes", pa.int64()),
        ("backend", pa.string()),
        ("shards", pa.int64()),
        ("driver_peak_rss_mb", pa.float64()),
        ("shard_peak_rss_mb", pa.float64()),
        ("shard_peak_gpu_mb", pa.float64()),  # null when the shards run on CPU
        ("plan_peak_mb", pa.float64()),  # the query's memory plan: its largest process's peak (null: no plan)
        ("driver_read_bytes", pa.int64()),  # of pool files, read by the driver's process so far
        # the stopping criteria on the stop set after the round (core.stopping): value and verdict
        *[(f"stop_{c}{part}", kind) for c in CRITERIA for part, kind in (("", pa.float64()), ("_holds", pa.bool_()))],
        ("stopped_by", pa.string()),  # the --stop criterion that ended the run at this round, else null
    ]
)
QUERY_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("round", pa.int64()),
        ("pool_index", pa.int64()),
        ("dataset_index", pa.int64()),
        ("label", pa.int64()),
    ]
)
# A sweep's results dataset partitions queries by these columns (hive layout: values in the path).
PARTITIONS = ("dataset", "setting")
SWEEP_QUERY_SCHEMA = QUERY_SCHEMA.append(pa.field("dataset", pa.string())).append(pa.field("setting", pa.string()))
# measurements that differ between runs computing the same thing (left out when comparing rows)
TIMING_COLUMNS = tuple(n for n in ROUND_SCHEMA.names if n.endswith(("_seconds", "_mb"))) + (
    "selection_state_bytes",
    "driver_read_bytes",
)


# ---------------------------------------------------------------------------------------------
# Identity: what a run computes. The one place that says which config fields leave it out, and why.

# RunConfig fields (dotted, as in config.json) that do not make a run what it is: the same
# computation named another way, or placed elsewhere. Every other field is digested: the data
# (dataset, setting, class counts, --skip-bad-images), the model, training, the strategy,
# init/batch/rounds/budget and the seed. `data.dataset` stays even where it is a path
# (imagefolder:, parquet:): it is the only name fm_ray has for that data before reading it.
IDENTITY_FREE: dict[str, str] = {
    "preset": "a name for setting/init/batch/budget, which are digested themselves",
    "data.data_dir": "where the built-in datasets are read from, not which: Fashion-MNIST's files are md5-checked",
    "train.device": "where training runs; a request (auto resolves per machine), not what is computed",
    "pool.backend": "where the pool runs: the picks are the same in-process or on Ray actors",
    "pool.shards": "how the pool is split: the picks are the same on 1 or N shards by design",
    "pool.cpus_per_shard": "resources of a shard, not what it computes",
    "pool.gpus_per_shard": "resources of a shard, not what it computes",
    "pool.ray_address": "which Ray cluster runs the shards",
    "pool.driver_cpus": "where the recipe itself runs (fm_ray/run/remote.py): the same rows",
    "pool.driver_gpus": "where the recipe itself runs (fm_ray/run/remote.py): the same rows",
    "dry_run": "prints the memory plan and computes nothing",
}
# StrategyConfig's approximation fields at their exact defaults, and the Bayesian, stochastic-batch,
# cold-start and stopping options at their defaults, are left out too, so the runs made before these
# fields existed keep their ids (set to anything else, they are digested)
EXACT = {
    "strategy.candidates": None,
    "strategy.candidate_rule": "uniform",
    "strategy.top_classes": None,
    "strategy.project": None,
    "strategy.fisher_pool": None,
    "strategy.mc_samples": 20,
    "strategy.mc_dropout": 0.5,
    "strategy.batchbald_samples": 10_000,
    "strategy.stochastic": None,
    "strategy.beta": 1.0,
    "strategy.probcover_delta": 0.75,
    "strategy.features": None,
    "init_strategy": None,
    "stop": None,
    "stop_set": 1000,
}


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict -> one level, keys dotted as in config.json (`strategy.lam`)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def identity(cfg: RunConfig) -> dict[str, Any]:
    """The fields that make a run what it is: every RunConfig field but those in IDENTITY_FREE, those
    at their EXACT defaults, and the options of strategies the run does not use (`Strategy.own_options`:
    a grid may set BatchBALD's joint size without renaming its other trials)."""
    flat = flat_config(to_dict(cfg))
    unread = _unread_options(cfg)
    return {
        k: v
        for k, v in flat.items()
        if k not in IDENTITY_FREE and k not in unread and not (k in EXACT and EXACT[k] == v)
    }


def _unread_options(cfg: RunConfig) -> set[str]:
    from fm_ray.strategies import STRATEGIES

    used = [STRATEGIES[n] for n in (cfg.strategy.name, cfg.init_strategy) if n in STRATEGIES]
    owned = {f for s in STRATEGIES.values() for f in s.own_options}
    return {f"strategy.{f}" for f in owned - {f for s in used for f in s.own_options}}


def run_id(cfg: RunConfig) -> str:
    """Stable id of what a run computes: a digest of `identity(cfg)` (see IDENTITY_FREE).

    It names files and Tune trial dirs, so its readable part keeps only safe characters. A run
    directory keeps the id it was created with (config.json): resumes and results use that one.
    """
    digest = hashlib.sha1(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:10]
    readable = f"{cfg.data.dataset.split(':')[0]}-{cfg.data.setting}-{cfg.strategy.name}-s{cfg.seed}"
    return f"{safe_name(readable)}-{digest}"


def _write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    write_atomically(path, lambda f: pq.write_table(table, f))  # a crash leaves the previous round's file


def _read(path: Path, needs: tuple[str, ...]) -> list[dict[str, Any]]:
    """A results file as rows; a damaged one is a UserError (never a traceback, never half a run)."""
    if not path.exists():
        return []
    try:
        table = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is damaged ({first}): use --overwrite to start the run afresh") from None
    lacking = [n for n in needs if n not in table.column_names]
    if lacking:
        raise UserError(f"{path} lacks column(s) {', '.join(lacking)}: use --overwrite to start the run afresh")
    return table.to_pylist()


class RunDir:
    """config.json + rounds.parquet + queries.parquet + the latest warm-start checkpoint-r<round>.pt.

    Per round the loop writes queries, then rows, then (atomically) that round's weights, so a
    crash anywhere leaves files a resume can continue from with the same results.
    """

    def __init__(self, out: str | Path):
        if "://" in str(out):
            raise UserError(
                f"--out {out}: fm-ray run writes to a local folder; use `fm-ray sweep --out {out}` for "
                "object storage, or copy the run folder there afterwards"
            )
        self.path = Path(out)
        self.rounds_path = self.path / "rounds.parquet"
        self.queries_path = self.path / "queries.parquet"
        self.config_path = self.path / "config.json"
        self.stop_preds_path = self.path / "stop_preds.npy"  # the stop set's predictions, rounds x N

    def checkpoint_path(self, round_: int) -> Path:
        """Model weights at the end of round `round_` (what warm-start round `round_ + 1` starts from)."""
        return self.path / f"checkpoint-r{round_}.pt"

    def checkpoints(self) -> list[Path]:
        return sorted(self.path.glob("checkpoint-r*.pt")) + [p for p in [self.path / "checkpoint.pt"] if p.exists()]

    def holds_run(self) -> bool:
        return self.config_path.exists() or self.rounds_path.exists()

    def preflight(self, resume: bool, overwrite: bool) -> None:
        """Before any work: --out can hold a run, --resume has one to continue, and an existing one
        is replaced only with --overwrite."""
        self.check_writable()
        if resume and not self.holds_run():
            raise UserError(f"--resume: no run to continue in {self.path}: drop --resume to start one there")
        if self.holds_run() and not (resume or overwrite):
            raise UserError(
                f"{self.path} already holds a run: pass --resume to continue it or --overwrite to replace it"
            )

    def check_writable(self) -> None:
        """Fail before any work if --out cannot hold a run (a file, or a folder we may not write)."""
        check_folder_target(self.path, "--out")

    def open(self, cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[list[dict], list[dict]]:
        """Create, resume (returns the finished rows and queries) or overwrite the run directory.

        Call it only after every check of the new configuration passed: --overwrite deletes here.
        """
        self.preflight(resume, overwrite)
        exists = self.holds_run()
        if exists and overwrite:
            for p in (self.rounds_path, self.queries_path, self.config_path, self.stop_preds_path, *self.checkpoints()):
                p.unlink(missing_ok=True)
            exists = False
        if exists:
            return self._load(cfg)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            _write_text(self.config_path, json.dumps({"run_id": run_id(cfg), "config": to_dict(cfg)}, indent=2))
        except OSError as e:
            raise UserError(f"--out {self.path}: cannot write there ({e.strerror}): give a writable folder") from None
        return [], []

    def stored(self) -> tuple[str, RunConfig]:
        """The run id and config in config.json: the id the run was created with, kept for good
        (a run created before the identity rule changed keeps its old id)."""
        try:
            stored = json.loads(self.config_path.read_text())
            rid, cfg = stored["run_id"], from_dict(stored["config"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            rid = cfg = None
        if not isinstance(rid, str) or safe_name(rid) != rid or cfg is None:  # the id names files
            raise UserError(f"{self.config_path} is missing or damaged: use --overwrite to start the run afresh")
        return rid, cfg

    def stored_run_id(self) -> str | None:
        """The id in config.json, or None where there is no readable one."""
        try:
            return self.stored()[0]
        except UserError:
            return None

    def _load(self, cfg: RunConfig) -> tuple[list[dict], list[dict]]:
        rid, stored = self.stored()
        # the same run when it computes the same: fields in IDENTITY_FREE may change between sessions
        ours, theirs = identity(cfg), identity(stored)
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differ:
            raise UserError(
                f"{self.path} holds a different run ({rid}; {', '.join(differ)} differ): pass the same options "
                "to resume, or --overwrite / another --out"
            )
        rows = _read(self.rounds_path, ("run_id", "round", "n_queried"))
        queries = _read(self.queries_path, ("round", "pool_index"))
        if [r["round"] for r in rows] != list(range(len(rows))):
            raise UserError(f"{self.rounds_path} does not hold rounds 0, 1, ... in order: use --overwrite")
        if cfg.train.warm_start:
            # a warm start continues from the last finished round's weights; if the crash came
            # between that round's rows and its checkpoint, redo the round instead of loading older weights
            if rows and not self.checkpoint_path(rows[-1]["round"]).exists():
                log(f"{self.path}: the weights of round {rows[-1]['round']} were never saved: redoing it")
                rows.pop()
            if rows and not self.checkpoint_path(rows[-1]["round"]).exists():
                raise UserError(
                    f"{self.path} lacks the warm-start weights of rounds {rows[-1]['round']} and later "
                    f"(checkpoint-r<round>.pt): use --overwrite to start the run afresh"
                )
        # Queries are written before their round's row: drop any whose row never landed.
        last = rows[-1]["round"] if rows else -1
        queries = [q for q in queries if q["round"] <= last + 1]
        for r in rows:
            n = sum(q["round"] == r["round"] + 1 for q in queries)
            if n != r["n_queried"]:
                raise UserError(
                    f"{self.queries_path} holds {n} queries of round {r['round']}, its row says {r['n_queried']}: "
                    "use --overwrite to start the run afresh"
                )
        return rows, queries

    def write_queries(self, queries: list[dict]) -> None:
        _write(self.queries_path, queries, QUERY_SCHEMA)

    def write_rows(self, rows: list[dict]) -> None:
        _write(self.rounds_path, rows, ROUND_SCHEMA)

    def write_stop_preds(self, preds_R_N: np.ndarray) -> None:
        write_atomically(self.stop_preds_path, lambda f: np.save(f, preds_R_N))

    def read_stop_preds(self) -> list[np.ndarray]:
        """The stop set's predictions of the rounds written so far (none where the file is missing:
        the criteria over several rounds then start afresh)."""
        if not self.stop_preds_path.exists():
            return []
        try:
            return list(np.load(self.stop_preds_path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise UserError(
                f"{self.stop_preds_path} is damaged ({e}): use --overwrite to start the run afresh"
            ) from None

    def save_checkpoint(self, state: dict[str, Any], round_: int) -> None:
        """Round `round_`'s weights, atomically (temp name + rename); then older checkpoints go."""
        import torch

        path = self.checkpoint_path(round_)
        write_atomically(path, lambda f: torch.save(state, f))
        for old in self.checkpoints():
            if old != path:
                old.unlink(missing_ok=True)

    def load_checkpoint(self, round_: int) -> dict[str, Any]:
        import torch

        path = self.checkpoint_path(round_)
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
            # weights_only refuses pickled objects other than tensors (they could run code)
            raise UserError(
                f"{path} is unreadable or not plain weights ({type(e).__name__}): delete it to redo round {round_}"
            ) from None


def _write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda f: f.write(text.encode()))
