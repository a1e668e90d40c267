"""How every cost of a query round grows with the pool, up to a million samples on one machine.

    python -m benchmarks.million --source fashion_mnist --n 62500 250000 1000000 \
        --strategies random,margin,kcenter,badge,fishermask,fishermask:fisher_pool=20000:candidates=20000 --shards 2
    python -m benchmarks.million --source cifar10 --size 64 --n 80000 320000 \
        --strategies margin,fishermask:fisher_pool=20000:candidates=20000
    python -m benchmarks.million --n 2000 8000 --strategies margin   # a smoke run in a minute

Per n it builds (or reuses, under `--pools`, default `$FM_RAY_CACHE/benchmarks/million`) a packed
pool of n rows made from real images: row i is source train image `i mod M` under a seeded variant
(a shift of up to 2 pixels, a horizontal flip, +-4 grey levels of noise), so every row is distinct;
the test split is the source's own. CIFAR-10 images are resized to `--size` first. Then, per
strategy (`name[:field=value...]`, fields of StrategyConfig), one `fm-ray run` round (`--init`
labels, one query of `--K`, the small CNN, `--epochs` of training) on `--shards` Ray shard actors,
in a fresh child process so each row's driver peak belongs to it alone. One JSON line per
(n, strategy):

  round_s            the query's wall time: forward pass, mask, embeddings, selection (rounds.parquet)
  forward_s          the forward pass over every pool sample (probabilities and features)
  mask_s             FisherMask's Fisher diagonal and mask (--fisher-samples of the pool; 0 elsewhere)
  embed_s            Fisher/gradient embeddings and their partial sums (0 where none)
  select_s           the selection itself
  train_s            training on the labeled set (does not grow with the pool)
  driver_peak_rss_mb the run's driver process, training and evaluation included
  shard_peak_rss_mb  the largest shard actor's peak RSS (VmHWM) after the query
  driver_read_bytes  bytes of pool files the driver process read (labels, test split, footers)
  pool_pixel_bytes   n * C * H * W: the pool's pixels, never held by one process
  plan_mb            the memory plan's figure for the largest process (the run refuses a plan that does not fit)
  load_avg           the machine's 1-minute load average when the row finished (these machines are shared)

With `--repeat R` each row is R runs: its times are their minimum, its peaks their maximum, and
`round_s_runs` lists every run's round time. The driver runs with glibc's mmap threshold fixed
(`fixed_mmap_threshold`), so its peak is what it holds, not what the heap kept of earlier frees.

then one line `{"bench": "million_scaling", ...}`: per strategy and measure, the log-log slope
against n over all n (`slope`) and between the two largest (`slope_last`), and the ratios the
targets are stated in (largest n over smallest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROWS_PER_FILE = 16384
MEASURES = (
    "round_s",
    "forward_s",
    "embed_s",
    "select_s",
    "driver_peak_rss_mb",
    "shard_peak_rss_mb",
    "driver_read_bytes",
)


# -- the pools: real images under seeded variants ----------------------------------------------------
def variants(x_N_C_H_W: np.ndarray, seed: int, start: int) -> np.ndarray:
    """Each image under its own seeded shift (up to 2 pixels, zero fill), flip and +-4 noise."""
    rng = np.random.default_rng([seed, start])
    N = len(x_N_C_H_W)
    out = np.zeros_like(x_N_C_H_W)
    dy, dx, flip = rng.integers(-2, 3, N), rng.integers(-2, 3, N), rng.random(N) < 0.5
    H, W = x_N_C_H_W.shape[-2:]
    for sy in range(-2, 3):
        for sx in range(-2, 3):
            rows = np.flatnonzero((dy == sy) & (dx == sx))
            src = x_N_C_H_W[rows][..., max(0, -sy) : H - max(0, sy), max(0, -sx) : W - max(0, sx)]
            out[rows, :, max(0, sy) : H - max(0, -sy), max(0, sx) : W - max(0, -sx)] = src
    out[flip] = out[flip][..., ::-1]
    noise = rng.integers(-4, 5, out.shape, dtype=np.int16)
    return np.clip(out.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def source_images(source: str, size: int | None) -> tuple[Any, str]:
    """(the source as a Dataset with its train and test images resized to `size`, its description)."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    from fm_ray.config import DataConfig
    from fm_ray.data.core import tensor_split
    from fm_ray.data.registry import open_source

    data = open_source(DataConfig(dataset=source))
    side = data.train.images.shape[-1]
    if size is None or size == side:
        return data, f"{source}-{side}"

    def resized(x: torch.Tensor) -> torch.Tensor:
        out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True) for c in x.split(4096)]
        return torch.cat(out).round().clamp(0, 255).to(torch.uint8)

    train, test = data.train, data.test
    assert test is not None and train.labels is not None
    return dataclasses.replace(
        data,
        train=tensor_split(train.ids, train.labels, resized(data.train_x)),
        test=tensor_split(test.ids, test.labels, resized(data.test_x)),
    ), f"{source}-{size}"


def pool_source(n: int, source: str, size: int | None, seed: int) -> Any:
    """The pack source of an n-row pool (fm_ray.data.pack.PackSource), made as the pack reads it."""
    from fm_ray.data.fingerprint import Item, array_listing
    from fm_ray.data.pack import Chunk, PackSource, Split

    data, name = source_images(source, size)
    base_x, base_y = data.train_x.numpy(), data.train_y.numpy()
    test_x, test_y = data.test_x.numpy(), data.test_y.numpy()
    M = len(base_x)

    def read_train(a: int, b: int) -> Chunk:
        rows = np.arange(a, b) % M
        return Chunk([f"v/{i}" for i in range(a, b)], base_y[rows].tolist(), variants(base_x[rows], seed, a))

    def read_test(a: int, b: int) -> Chunk:
        return Chunk([f"test/{i}" for i in range(a, b)], test_y[a:b].tolist(), test_x[a:b])

    options = {"source": f"million-{name}-n{n}-seed{seed}"}
    # a row is a function of (options, row): that names its content without making it twice
    size_bytes = int(np.prod(base_x.shape[1:]))
    train_listing = [Item(f"v/{i}", int(base_y[i % M]), size_bytes, f"{options['source']}/{i}") for i in range(n)]
    test_listing = array_listing([f"test/{i}" for i in range(len(test_x))], test_y.tolist(), test_x)
    splits = {"train": Split(n, read_train, train_listing), "test": Split(len(test_x), read_test, test_listing)}
    classes = list(data.classes) if data.classes else [str(c) for c in range(10)]
    return PackSource(f"million-{name}", splits, classes, None, False, options)  # mean/std of the rows themselves


def child_pack(a: argparse.Namespace) -> dict[str, Any]:
    from fm_ray.data.pack import pack_source

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only
        pack_source(pool_source(a.n[0], a.source, a.size, a.seed), a.pool, ROWS_PER_FILE)
    return {"pack_s": round(time.perf_counter() - start, 3)}


# -- one query round on the pool, in a fresh process --------------------------------------------------
def strategy_config(spec: str) -> Any:
    """`name[:field=value...]` -> StrategyConfig (values parsed as JSON, else kept as text)."""
    from fm_ray.config import StrategyConfig

    name, *pairs = spec.split(":")
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            fields[key] = json.loads(value)
        except ValueError:
            fields[key] = value
    return StrategyConfig(name=name, **fields)


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc's mmap threshold fixed in this process (Linux; elsewhere nothing): left dynamic, it
    rises after large frees and the heap then keeps freed blocks, so the peak RSS of the driver
    (whose largest transient is the test split's evaluation) varied by ~200 MB between identical
    runs, depending on the order of frees rather than on what is alive."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux" or not (name := ctypes.util.find_library("c")):
        return
    M_MMAP_THRESHOLD = -3
    ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, nbytes)


def child_run(a: argparse.Namespace) -> dict[str, Any]:
    fixed_mmap_threshold()  # the driver only: shards and Ray's own processes keep glibc's default
    import ray

    from fm_ray.config import DataConfig, ModelConfig, PoolConfig, RunConfig, TrainConfig
    from fm_ray.pool.shard import peak_rss_mb
    from fm_ray.run.recipe import run_experiment

    ray.init(address="local", num_cpus=a.shards, include_dashboard=False, log_to_driver=False)
    rows: list[dict] = []
    cfg = RunConfig(
        data=DataConfig(dataset=f"parquet:{a.pool}", setting="balanced"),
        model=ModelConfig("cnn"),
        train=TrainConfig(epochs=a.epochs, device="cpu"),
        strategy=strategy_config(a.strategies),
        pool=PoolConfig(backend="ray", shards=a.shards),
        init=a.init,
        batch=a.K,
        rounds=1,
        seed=a.seed,
    )
    try:
        with contextlib.redirect_stdout(sys.stderr):
            run_experiment(cfg, Path(a.pool).parent / "run", overwrite=True, on_round=rows.append)
    finally:
        ray.shutdown()
    r = rows[0]  # round 0: trained on --init labels, then the query
    return {
        "round_s": round(r["query_seconds"], 3),
        "forward_s": round(r.get("forward_seconds") or 0.0, 3),
        "mask_s": round(r.get("mask_seconds") or 0.0, 3),
        "embed_s": round(r.get("embed_seconds") or 0.0, 3),
        "select_s": round(r.get("select_seconds") or 0.0, 3),
        "train_s": round(r["train_seconds"], 3),
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "shard_peak_rss_mb": round(r["shard_peak_rss_mb"], 1),
        "driver_read_bytes": int(r["driver_read_bytes"]),
        "plan_mb": None if r.get("plan_peak_mb") is None else round(r["plan_peak_mb"], 1),
        "accuracy": round(r["accuracy"], 4),
    }


def _child(kind: str, argv: list[str]) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its last stdout line is the phase's JSON."""
    cmd = [sys.executable, "-m", "benchmarks.million", *argv, "--child", kind]
    root = str(Path(__file__).resolve().parents[1])  # so the child imports this checkout's fm_ray and benchmarks
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise SystemExit(f"million {kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def repeated(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of identical runs: each time (`*_s`) their minimum, the least disturbed by the other
    work of a shared machine, each peak their maximum, and every run's round time."""
    row = dict(runs[0])
    for key in row:
        values = [r[key] for r in runs]
        if key.endswith("_s"):
            row[key] = min(values)
        elif key.endswith("_mb") and None not in values:
            row[key] = max(values)
    return row | ({"round_s_runs": [r["round_s"] for r in runs]} if len(runs) > 1 else {})


# -- the scaling summary ------------------------------------------------------------------------------
def loglog_slope(n: list[float], y: list[float]) -> float | None:
    """Least-squares slope of log y against log n (None where a value is not positive)."""
    if len(n) < 2 or min(y) <= 0:
        return None
    ln, ly = np.log(n), np.log(y)
    return float(np.polyfit(ln, ly, 1)[0])


def scaling(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "million_scaling"}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["n"])
        n = [r["n"] for r in mine]
        entry: dict[str, Any] = {"n": n}
        for m in MEASURES:
            y = [r[m] for r in mine]
            slope, last = loglog_slope(n, y), loglog_slope(n[-2:], y[-2:])
            entry[m] = {
                "slope": None if slope is None else round(slope, 3),
                "slope_last": None if last is None else round(last, 3),
                "ratio": None if not y[0] else round(y[-1] / y[0], 3),
            }
        out[strategy] = entry
    return out


def pool_dir(a: argparse.Namespace, n: int) -> Path:
    from fm_ray._internal.files import cache_dir

    root = Path(a.pools) if a.pools else cache_dir() / "benchmarks" / "million"
    return root / f"{a.source}-{a.size or 'native'}-n{n}-seed{a.seed}" / "pool"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", choices=["fashion_mnist", "cifar10"], default="fashion_mnist")
    ap.add_argument("--size", type=int, help="resize the source images to SIZE x SIZE (default: as they are)")
    ap.add_argument("--n", type=int, nargs="+", default=[62_500, 250_000, 1_000_000], help="pool sizes")
    ap.add_argument("--strategies", default="random,margin", help="comma-separated name[:field=value...]")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--K", type=int, default=50, help="samples picked in the round")
    ap.add_argument("--init", type=int, default=100, help="initial labeled samples")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pools", help="where the packed pools are built and reused")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row: times are their minimum, peaks their maximum")
    ap.add_argument("--child", choices=["pack", "run"], help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        out = child_pack(a) if a.child == "pack" else child_run(a)
        print(json.dumps(out), flush=True)
        return [out]
    common = ["--source", a.source, "--shards", str(a.shards), "--K", str(a.K), "--init", str(a.init),
              "--epochs", str(a.epochs), "--seed", str(a.seed)] + (["--size", str(a.size)] if a.size else [])  # fmt: skip
    rows: list[dict[str, Any]] = []
    for n in a.n:
        pool = pool_dir(a, n)
        packed = {} if (pool / "pool.json").exists() else _child("pack", [*common, "--n", str(n), "--pool", str(pool)])
        from fm_ray.data.parquet import open_pool

        shape = open_pool(str(pool)).shape
        for spec in a.strategies.split(","):
            row = {"bench": "million", "n": n, "strategy": spec, "source": a.source, "size": shape[-1], **packed}
            runs = [_child("run", [*common, "--n", str(n), "--strategies", spec, "--pool", str(pool)])
                    for _ in range(a.repeat)]  # fmt: skip
            row |= repeated(runs)
            row |= {"pool_pixel_bytes": n * math.prod(shape), "load_avg": round(os.getloadavg()[0], 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = scaling(rows)
    print(json.dumps(summary), flush=True)
    return [*rows, summary]


if __name__ == "__main__":
    main()
