"""The approximations against exact FisherMask on real FashionMNIST: same model, same labeled set.

    python -m benchmarks.approx [--quick] [--n 4000] [--init 100] [--K 100] [--sparsity 0.03]
        [--epochs 10] [--seed 0] [--fisher-pool 1000] [--only fisher_pool,fisher_pool_candidates]

A seeded CNN is trained on a seeded labeled subset of the first --n FashionMNIST training images;
exact FisherMask and each approximation then pick K from the same pool with the same model (the
local pool, one shard). Per approximation, one JSON line:
  approx, params      which one and its settings (the StrategyConfig fields)
  pick_overlap        |picks & exact picks| / K
  state_bytes_ratio   selection state (the shard's embeddings and greedy state, plus the driver's
                      F and M^-1) over exact's
  seconds_ratio       query wall time over exact's (measured in the same run, one after the other,
                      after an untimed warm-up query)
  acc_after_round     test accuracy of a fresh seeded CNN trained on labeled + picks (exact's row:
                      "exact"; the other rows show exact's in acc_exact)
--quick (about 2,000 images, K = 50, fewer epochs) finishes in a few minutes on a 2-core CPU.
`fisher_pool` (F from a sample of --fisher-pool unlabeled samples) and `fisher_pool_candidates`
(the same with as many uniform candidates) are the million-sample pool's approximations; --only
runs the named rows (exact always runs).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fm_ray.config import DataConfig, ModelConfig, StrategyConfig, TrainConfig
from fm_ray.data.normalize import Normalizer
from fm_ray.data.registry import open_source
from fm_ray.model.train import evaluate, train_model
from fm_ray.model.zoo import build_model
from fm_ray.pool.local import LocalPool
from fm_ray.pool.shard import ShardSpec, set_round, state_bytes
from fm_ray.strategies import STRATEGIES, QueryContext

APPROX: list[tuple[str, dict]] = [
    ("candidates_uniform", {"candidates": 500}),
    ("candidates_entropy", {"candidates": 500, "candidate_rule": "entropy"}),
    ("top_classes", {"top_classes": 3}),
    ("top_classes", {"top_classes": 1}),
    ("project", {"project": 512}),
    ("project", {"project": 128}),
]


def approximations(fisher_pool: int) -> list[tuple[str, dict]]:
    return [
        *APPROX,
        ("fisher_pool", {"fisher_pool": fisher_pool}),
        ("fisher_pool_candidates", {"fisher_pool": fisher_pool, "candidates": fisher_pool}),
    ]


def trained_cnn(x_u8, y, norm, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig("cnn"), 1, 28, 10)
    train_model(model, x_u8, y, norm, False, TrainConfig(epochs=epochs), torch.device("cpu"), seed)
    return model.eval()


def query(pool, model, labeled, k, seed, cfg: StrategyConfig) -> tuple[list[int], float, int]:
    """Picks, seconds, and the state bytes: the shard's (embeddings, greedy state) + F and M^-1."""
    weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    start = time.perf_counter()
    pool.map(set_round, weights, labeled)
    sel = STRATEGIES[cfg.name].select(
        pool, QueryContext(1, k, seed, labeled, pool.shards[0].index_N.numel(), cfg, model)
    )
    seconds = time.perf_counter() - start
    width = cfg.project or sel.info["mask_size"]
    return sel.indices, seconds, sum(pool.map(state_bytes)) + 2 * width * width * 8


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--init", type=int, default=100)
    p.add_argument("--K", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.03)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--test", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fisher-pool", type=int, default=1000, help="the fisher_pool rows' sample size")
    p.add_argument("--only", help="comma-separated approximation names to run (default: all)")
    a = p.parse_args(argv)
    if a.quick:
        a.n, a.K, a.epochs, a.test, a.fisher_pool = 2048, 50, 5, 2000, 500
    data = open_source(DataConfig(dataset="fashion_mnist"))
    norm = Normalizer((0.2860,), (0.3530,))
    x_pool, y_pool = data.train_x[: a.n], data.train_y[: a.n]
    if a.n > len(x_pool):  # beyond the real train split: benchmarks.million's seeded variants of it
        from benchmarks.million import pool_source

        chunk = pool_source(a.n, "fashion_mnist", None, a.seed).splits["train"].read(0, a.n)
        x_pool, y_pool = torch.from_numpy(chunk.images), torch.tensor(chunk.labels)
    x_test, y_test = data.test_x[: a.test], data.test_y[: a.test].numpy()
    labeled = np.sort(np.random.default_rng(a.seed).choice(a.n, a.init, replace=False))
    model = trained_cnn(x_pool[labeled], y_pool[labeled], norm, a.epochs, a.seed)
    pool = LocalPool(ShardSpec(ModelConfig("cnn"), 1, 28, 10, norm, "cpu"), x_pool, 1)

    def acc_after(picks: list[int]) -> float:
        chosen = np.union1d(labeled, picks)
        fresh = trained_cnn(x_pool[chosen], y_pool[chosen], norm, a.epochs, a.seed)
        return float(evaluate(fresh, x_test, y_test, norm, torch.device("cpu"), 10)["accuracy"])

    base = StrategyConfig(name="fishermask", sparsity=a.sparsity)
    query(pool, model, labeled, a.K, a.seed, base)  # warm-up: exact's timing would include torch's first calls
    exact, exact_s, exact_bytes = query(pool, model, labeled, a.K, a.seed, base)
    acc_exact = acc_after(exact)
    rows = [
        {
            "approx": "exact",
            "params": {"sparsity": a.sparsity},
            "pick_overlap": 1.0,
            "state_bytes_ratio": 1.0,
            "seconds_ratio": 1.0,
            "acc_after_round": acc_exact,
            "exact_seconds": exact_s,
            "exact_state_bytes": exact_bytes,
        }
    ]
    print(json.dumps(rows[0]), flush=True)
    for name, params in approximations(a.fisher_pool):
        if a.only and name not in a.only.split(","):
            continue
        cfg = StrategyConfig(name="fishermask", sparsity=a.sparsity, **params)
        picks, seconds, nbytes = query(pool, model, labeled, a.K, a.seed, cfg)
        row = {
            "approx": name,
            "params": params,
            "pick_overlap": len(set(picks) & set(exact)) / a.K,
            "state_bytes_ratio": nbytes / exact_bytes,
            "seconds_ratio": seconds / exact_s,
            "acc_after_round": acc_after(picks),
            "acc_exact": acc_exact,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
