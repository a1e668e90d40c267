"""A run directory: config.json, rounds.parquet and queries.parquet, rewritten atomically per round."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fm_ray.config import RunConfig, to_dict
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
        ("mask_seconds", pa.float64()),
        ("embed_seconds", pa.float64()),
        ("select_seconds", pa.float64()),
        ("mask_size", pa.int64()),
        ("mask_profile", pa.list_(_PROFILE)),
        ("selection_state_bytes", pa.int64()),
        ("backend", pa.string()),
        ("shards", pa.int64()),
        ("driver_peak_rss_mb", pa.float64()),
        ("shard_peak_rss_mb", pa.float64()),
        ("shard_peak_gpu_mb", pa.float64()),  # null when the shards run on CPU
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
TIMING_COLUMNS = tuple(n for n in ROUND_SCHEMA.names if n.endswith(("_seconds", "_mb"))) + ("selection_state_bytes",)


def run_id(cfg: RunConfig) -> str:
    """Stable id of what a run computes (independent of backend, shard count and device)."""
    d = to_dict(cfg)
    d.pop("pool")
    d["train"].pop("device")
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.data.dataset.split(':')[0]}-{cfg.data.setting}-{cfg.strategy.name}-s{cfg.seed}-{digest}"


def _write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    tmp.replace(path)  # atomic: a crash leaves the previous round's file intact


class RunDir:
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
        self.checkpoint_path = self.path / "checkpoint.pt"

    def open(self, cfg: RunConfig, resume: bool, overwrite: bool) -> tuple[list[dict], list[dict]]:
        """Create, resume (returns the finished rows and queries) or overwrite the run directory."""
        exists = self.config_path.exists() or self.rounds_path.exists()
        if exists and overwrite:
            for p in (self.rounds_path, self.queries_path, self.config_path, self.checkpoint_path):
                p.unlink(missing_ok=True)
            exists = False
        if exists and not resume:
            raise UserError(
                f"{self.path} already holds a run: pass --resume to continue it or --overwrite to replace it"
            )
        if exists:
            return self._load(cfg)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps({"run_id": run_id(cfg), "config": to_dict(cfg)}, indent=2))
        return [], []

    def _load(self, cfg: RunConfig) -> tuple[list[dict], list[dict]]:
        try:
            stored = json.loads(self.config_path.read_text())
        except (OSError, ValueError):
            raise UserError(f"{self.config_path} is missing or unreadable: use --overwrite to start afresh") from None
        if stored.get("run_id") != run_id(cfg):
            raise UserError(
                f"{self.path} holds a different run ({stored.get('run_id')}): pass the same options to resume, "
                "or --overwrite / another --out"
            )
        rows = pq.read_table(self.rounds_path).to_pylist() if self.rounds_path.exists() else []
        queries = pq.read_table(self.queries_path).to_pylist() if self.queries_path.exists() else []
        # Queries are written before their round's row: drop any whose row never landed.
        last = rows[-1]["round"] if rows else -1
        return rows, [q for q in queries if q["round"] <= last + 1]

    def write_round(self, rows: list[dict], queries: list[dict]) -> None:
        _write(self.queries_path, queries, QUERY_SCHEMA)
        _write(self.rounds_path, rows, ROUND_SCHEMA)
