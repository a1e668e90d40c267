"""Large pools from Parquet: the driver's memory stays flat as the pool grows; shards grow with n / shards.

    python -m benchmarks.large_pool --n 20000 80000 --shards 2 [--K 50] [--sparsity 0.01] [--init 100]

Per n: packs a synthetic pool of n images (real FashionMNIST train images, repeated, with seeded
Gaussian noise added; labels are the originals'; the test split is FashionMNIST's) into a
temporary folder, then runs one FisherMask round (small CNN, `--sparsity` 0.01: d = 720) on
`--shards` Ray shard actors with `--dataset parquet:<that folder>`. The run happens in a fresh child
process, so its driver's peak RSS belongs to that n alone. One JSON line per n:

  pack_s              wall time of packing the pool (Parquet files + manifest)
  embed_s, select_s   the round's Fisher-embedding and greedy-selection wall times (rounds.parquet)
  driver_peak_rss_mb  peak RSS of the run's driver process (getrusage), training and evaluation included
  shard_peak_rss_mb   largest peak RSS (VmHWM) among the shard actors, read after the round's query

then one ratio line (last n over first n): `driver_rss_ratio` (target <= 1.15: the driver holds
ids and labels, never the pool's pixels) and `shard_rss_ratio` against `n_ratio` (target: no more
than linear in n / shards).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fm_ray.pool.shard import peak_rss_mb

ROWS_PER_FILE = 8192


def synthetic_source(n: int, seed: int, noise: float) -> Any:
    """Rows i = FashionMNIST train image i mod 60,000 plus N(0, noise^2) pixel noise, seeded per file."""
    from fm_ray.config import DataConfig
    from fm_ray.data.fingerprint import Item, array_listing
    from fm_ray.data.pack import Chunk, PackSource, Split
    from fm_ray.data.registry import open_source

    fm = open_source(DataConfig(dataset="fashion_mnist"))
    base_x, base_y = fm.train_x.numpy(), fm.train_y.numpy()

    def read_train(a: int, b: int) -> Chunk:
        rows = np.arange(a, b) % len(base_x)
        noise_N = np.random.default_rng([seed, a]).normal(0.0, noise, size=(b - a, *base_x.shape[1:]))
        x = np.clip(base_x[rows] + noise_N, 0, 255).round().astype(np.uint8)
        return Chunk([f"syn/{i}" for i in range(a, b)], base_y[rows].tolist(), x)

    def read_test(a: int, b: int) -> Chunk:
        return Chunk([f"test/{i}" for i in range(a, b)], fm.test_y[a:b].tolist(), fm.test_x[a:b].numpy())

    options = {"source": f"synthetic-fashion_mnist-n{n}-seed{seed}-noise{noise}"}
    # the rows are a function of (options, row): that names their content without generating them twice
    train_listing = [Item(f"syn/{i}", int(base_y[i % len(base_y)]), 784, f"{options['source']}/{i}") for i in range(n)]
    test_ids = [f"test/{i}" for i in range(len(fm.test_x))]
    splits = {
        "train": Split(n, read_train, train_listing),
        "test": Split(len(fm.test_x), read_test, array_listing(test_ids, fm.test_y.tolist(), fm.test_x.numpy())),
    }
    return PackSource("synthetic_fashion_mnist", splits, [str(c) for c in range(10)], None, False, options)


def pack_pool(n: int, a: argparse.Namespace, pool: str) -> dict[str, Any]:
    from fm_ray.data.pack import pack_source

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only
        pack_source(synthetic_source(n, a.seed, a.noise), pool, ROWS_PER_FILE)
    return {"pack_s": round(time.perf_counter() - start, 3)}


def child_run(a: argparse.Namespace) -> dict[str, Any]:
    import ray

    import fm_ray.run.recipe as loop
    from fm_ray.config import DataConfig, ModelConfig, PoolConfig, RunConfig, StrategyConfig, TrainConfig

    ray.init(address="local", num_cpus=a.shards, include_dashboard=False, log_to_driver=False)
    out: dict[str, Any] = {}

    def after_round(row: dict) -> None:
        if row["round"] == 0:  # the largest shard actor's peak RSS, as every round row records it
            out["shard_peak_rss_mb"] = round(row["shard_peak_rss_mb"], 1)
            out.update(embed_s=round(row["embed_seconds"], 3), select_s=round(row["select_seconds"], 3))
            out["d"] = row["mask_size"]

    cfg = RunConfig(
        data=DataConfig(dataset=f"parquet:{a.pool}", setting="balanced"),
        model=ModelConfig("cnn"),
        train=TrainConfig(epochs=1, device="cpu"),
        strategy=StrategyConfig(name="fishermask", sparsity=a.sparsity),
        pool=PoolConfig(backend="ray", shards=a.shards),
        init=a.init,
        batch=a.K,
        rounds=1,
        seed=a.seed,
    )
    try:
        loop.run_experiment(cfg, Path(a.pool).parent / "run", on_round=after_round)
    finally:
        ray.shutdown()
    out["driver_peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def _child(kind: str, argv: list[str], pool: str) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its last stdout line is the phase's JSON."""
    cmd = [sys.executable, "-m", "benchmarks.large_pool", *argv, "--child", kind, "--pool", pool]
    root = str(Path(__file__).resolve().parents[1])  # so the child imports this checkout's fm_ray and benchmarks
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        raise SystemExit(f"large_pool {kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[20_000, 80_000], help="pool sizes")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--K", type=int, default=50, help="samples picked in the round")
    ap.add_argument("--init", type=int, default=100, help="initial labeled samples")
    ap.add_argument("--sparsity", type=float, default=0.01, help="mask fraction (cnn: 0.01 gives d = 720)")
    ap.add_argument("--noise", type=float, default=8.0, help="std of the pixel noise added to the real images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=["run"], help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        out = child_run(a)
        print(json.dumps(out), flush=True)
        return [out]
    results: list[dict[str, Any]] = []
    common = ["--shards", str(a.shards), "--K", str(a.K), "--init", str(a.init), "--sparsity", str(a.sparsity),
              "--noise", str(a.noise), "--seed", str(a.seed)]  # fmt: skip
    for n in a.n:
        with tempfile.TemporaryDirectory(prefix=f"fm_ray_large_pool_{n}_") as tmp:
            pool = str(Path(tmp) / "pool")
            row = {"bench": "large_pool", "n": n, "shards": a.shards, "K": a.K, "sparsity": a.sparsity}
            row |= pack_pool(n, a, pool)
            row |= _child("run", ["--n", str(n), *common], pool)
        print(json.dumps(row), flush=True)
        results.append(row)
    first, last = results[0], results[-1]
    ratio = {
        "bench": "large_pool_ratio",
        "n_first": first["n"],
        "n_last": last["n"],
        "n_ratio": round(last["n"] / first["n"], 3),
        "driver_rss_ratio": round(last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"], 3),
        "shard_rss_ratio": round(last["shard_peak_rss_mb"] / first["shard_peak_rss_mb"], 3),
    }
    ratio["driver_target_met"] = ratio["driver_rss_ratio"] <= 1.15
    ratio["shard_at_most_linear"] = ratio["shard_rss_ratio"] <= ratio["n_ratio"]
    print(json.dumps(ratio), flush=True)
    results.append(ratio)
    return results


if __name__ == "__main__":
    main()
