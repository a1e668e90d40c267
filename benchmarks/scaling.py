"""Ray pool scaling: Fisher embeddings and greedy selection on 1, 2, ... shard actors, same inputs.

    python -m benchmarks.scaling --shards 1 2 [--S 8192] [--model cnn|resnet18] [--sparsity 0.002]
        [--K 50] [--cpus-per-shard 1] [--repeats 3] [--seed 0]

Needs Ray (unlike benchmarks.selection and benchmarks.fisher); runs on CPU, no GPU needed.

Inputs, identical for every shard count: a seeded random-init model in eval mode, the first S
FashionMNIST train images when $FM_RAY_DATA holds them (else seeded random uint8 images of the same
shape), a seeded labeled subset of the pool, and one Fisher mask computed once on the driver. One
local Ray instance (num_cpus = sum(shards) * cpus_per_shard, logical) hosts one RayPool per shard count,
all kept up, and the counts are timed in turns (order alternating per repeat), so that load from other
processes on the machine hits every count alike; only one pool computes at a time.

Per shard count, one JSON line:
  embed_s           wall time of pool.map_sum(build_greedy_state, mask, "fast", chunk, "float32", "float32"): Fisher embeddings and
                    partial V^T V sums on all shards in parallel (min over --repeats)
  select_s          wall time of greedy_select over K steps, shard state init included (min over --repeats)
  step_ms           mean wall time of one greedy step (one broadcast + every shard's step + reduce)
  step_overhead_ms  mean per-step Ray overhead, measured as described in "method" (also p50 and max)
  speedup, select_speedup  embed_s / select_s of the smallest shard count divided by this one's
  embed_cpu_s       CPU seconds of the busiest shard actor in that embed phase (read from /proc): when
                    embed_s is well above it, other processes took CPU from the shards
  same_picks        picks equal to those of the smallest shard count
  driver_received_bytes, driver_received_dxd  tensor bytes the driver received for the partial
                    sums (pool.map_sum: added among the shards), also in units of one d x d float64
Exits non-zero if the picks differ across shard counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fm_ray.config import DataConfig, ModelConfig, PoolConfig
from fm_ray.core.fisher import fisher_diag_sum
from fm_ray.core.greedy import GreedyState, greedy_select
from fm_ray.core.mask import fisher_mask, mask_size
from fm_ray.data.normalize import Normalizer
from fm_ray.model.zoo import build_model
from fm_ray.pool import state_call
from fm_ray.pool.shard import ShardSpec, pid, set_round
from fm_ray.strategies.fisher import build_greedy_state
from fm_ray.strategies.uncertainty import top_scores

CLASSES = 10
METHOD = (
    "step_overhead_ms: mean wall time of no-op round trips pool.map(pid, update, backward) "
    "replaying each greedy step's exact arguments to every shard actor (a pid comes back, not a ShardBest)"
)


def load_images(S: int, seed: int, data: str) -> tuple[torch.Tensor, Normalizer, str]:
    """The first S FashionMNIST train images if $FM_RAY_DATA has them, else seeded random uint8 images."""
    root = os.environ.get("FM_RAY_DATA")
    if data != "random" and root and (Path(root).expanduser() / "FashionMNIST" / "raw").is_dir():
        from fm_ray.data.registry import open_source

        try:
            ds = open_source(DataConfig(dataset="fashion_mnist"))
        except Exception:  # unreadable archives: fall back to random images of the same shape
            ds = None
        if ds is not None and len(ds.train_x) >= S:
            return ds.train_x[:S].contiguous(), Normalizer(ds.mean, ds.std), "fashion_mnist"
    if data == "fashion_mnist":
        raise SystemExit(f"--data fashion_mnist: no FashionMNIST with >= {S} train images under $FM_RAY_DATA")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (S, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return x, Normalizer((0.5,), (0.2887,)), "random"


def driver_mask(
    model: torch.nn.Module, x_u8: torch.Tensor, norm: Normalizer, samples: int, sparsity: float, chunk: int
) -> torch.Tensor:
    """FisherMask's mask from the first `samples` pool images, computed once on the driver."""
    diag = fisher_diag_sum(model, norm(x_u8[:samples]), chunk_size=chunk)
    return fisher_mask(diag, mask_size(diag.numel(), sparsity))


class Timed:
    """One RayPool with `shards` actors on the shared inputs; `round()` times one embed + selection."""

    def __init__(self, shards: int, a: argparse.Namespace, spec: ShardSpec, x_u8: torch.Tensor, weights, labeled):
        from fm_ray.pool.ray_pool import RayPool

        self.a, self.labeled = a, labeled
        self.pool = RayPool(PoolConfig(backend="ray", shards=shards, cpus_per_shard=a.cpus_per_shard), spec, x_u8)
        self.pool.map(set_round, weights, labeled)
        # warm-up outside the timings: actors up, a forward pass over every shard (lazy torch init)
        self.pool.map(top_scores, "entropy", 1)
        self.pids = self.pool.map(pid)
        self._states = state_call(self.pool, GreedyState)
        self.embed: list[float] = []
        self.embed_cpu: list[float] = []  # the busiest shard's CPU seconds in each embed phase
        self.received: list[int] = []  # tensor bytes the driver received in each embed phase
        self.select: list[float] = []
        self.picks: list[int] | None = None
        self.steps: list[tuple[float, tuple]] = []  # (wall s, args) of each greedy step of the current round
        self.best_steps: list[tuple[float, tuple]] = []  # ... of the round with the fastest selection

    def _cpu_s(self) -> list[float]:
        """CPU seconds (user + system) of each shard actor's process so far; NaN where /proc is unreadable."""
        out = []
        for shard_pid in self.pids:
            try:
                fields = Path(f"/proc/{shard_pid}/stat").read_text().rsplit(")", 1)[1].split()
                out.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
            except (OSError, ValueError, IndexError):
                out.append(math.nan)
        return out

    def _call(self, fn: Any, *args: Any) -> list:
        start = time.perf_counter()
        out = self._states(fn, *args)
        if fn is GreedyState.step:
            self.steps.append((time.perf_counter() - start, args))
        return out

    def round(self, mask: torch.Tensor) -> None:
        cpu0 = self._cpu_s()
        start = time.perf_counter()
        received = self.pool.received_bytes
        # the partial sums are added among the shards (a tree over the object store): one sum arrives
        pool_sum, labeled_sum, count = self.pool.map_sum(
            build_greedy_state, mask, "fast", self.a.chunk, "float32", "float32"
        )
        self.received.append(self.pool.received_bytes - received)
        fisher_D_D = pool_sum / count
        self.embed.append(time.perf_counter() - start)
        self.embed_cpu.append(max(b - a for a, b in zip(cpu0, self._cpu_s(), strict=True)))
        self.steps.clear()
        start = time.perf_counter()
        picks = greedy_select(
            self._call, fisher_D_D, self.a.K, n_labeled=len(self.labeled), labeled_sum_D_D=labeled_sum
        )
        self.select.append(time.perf_counter() - start)
        if self.select[-1] == min(self.select):
            self.best_steps = list(self.steps)
        if self.picks is not None and picks != self.picks:
            raise SystemExit(f"{self.pool.n_shards} shards: picks changed between repeats")
        self.picks = picks

    def overhead_ms(self) -> list[float]:
        """No-op round trips carrying each greedy step's exact arguments (see METHOD)."""
        out = []
        for _, args in self.best_steps:
            start = time.perf_counter()
            self.pool.map(pid, *args)
            out.append(1e3 * (time.perf_counter() - start))
        return out


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)  # null, not NaN, where /proc was unreadable


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--S", type=int, default=8192, help="pool size")
    ap.add_argument("--model", choices=["cnn", "resnet18"], default="cnn")
    ap.add_argument("--sparsity", type=float, default=None, help="mask fraction (default: cnn 0.002, resnet18 1e-4)")
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--n-labeled", type=int, default=100)
    ap.add_argument("--cpus-per-shard", type=float, default=1.0)
    ap.add_argument(
        "--chunk", type=int, default=32, help="samples per gradient chunk (64: two shards thrash a shared L3)"
    )
    ap.add_argument("--fisher-samples", type=int, default=256, help="pool images for the mask's Fisher diagonal")
    ap.add_argument("--repeats", type=int, default=3, help="time embeddings and selection this often, keep the min")
    ap.add_argument("--data", choices=["auto", "fashion_mnist", "random"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    shard_counts = sorted(set(a.shards))
    if shard_counts[0] < 1 or a.n_labeled + a.K > a.S or a.repeats < 1:
        ap.error("need shards >= 1, repeats >= 1 and S >= n_labeled + K")
    sparsity = a.sparsity if a.sparsity is not None else {"cnn": 0.002, "resnet18": 1e-4}[a.model]

    import ray  # only this benchmark needs Ray

    x_u8, norm, data = load_images(a.S, a.seed, a.data)
    torch.manual_seed(a.seed)
    model = build_model(ModelConfig(a.model), x_u8.shape[1], x_u8.shape[-1], CLASSES).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    labeled = np.sort(np.random.default_rng(a.seed).choice(a.S, a.n_labeled, replace=False)).astype(np.int64)
    mask = driver_mask(model, x_u8, norm, min(a.fisher_samples, a.S), sparsity, a.chunk)
    spec = ShardSpec(ModelConfig(a.model), x_u8.shape[1], x_u8.shape[-1], CLASSES, norm, "cpu")

    own_ray = not ray.is_initialized()
    if own_ray:  # every pool stays up so the shard counts are timed in turns, under the same machine load
        cpus = math.ceil(sum(shard_counts) * a.cpus_per_shard)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    results: list[dict[str, Any]] = []
    runs: list[Timed] = []
    try:
        for n in shard_counts:
            runs.append(Timed(n, a, spec, x_u8, weights, labeled))
        load = os.getloadavg()[0]
        for rep in range(a.repeats):  # alternate the order so that a load drift hits all counts alike
            for run in runs if rep % 2 == 0 else runs[::-1]:
                run.round(mask)
        overhead = {id(run): run.overhead_ms() for run in runs}
        base = runs[0]
        for n, run in zip(shard_counts, runs, strict=True):
            out = {
                "bench": "scaling",
                "shards": n,
                "S": a.S,
                "d": int(mask.numel()),
                "K": a.K,
                "C": CLASSES,
                "model": a.model,
                "data": data,
                "sparsity": sparsity,
                "n_labeled": a.n_labeled,
                "cpus_per_shard": a.cpus_per_shard,
                "repeats": a.repeats,
                "embed_s": round(min(run.embed), 3),
                "select_s": round(min(run.select), 3),
                "speedup": round(min(base.embed) / min(run.embed), 2),
                "embed_cpu_s": _finite(run.embed_cpu[run.embed.index(min(run.embed))]),
                "select_speedup": round(min(base.select) / min(run.select), 2),
                "step_ms": round(1e3 * statistics.mean(s for s, _ in run.best_steps), 2),
                "step_overhead_ms": round(statistics.mean(overhead[id(run)]), 2),
                "step_overhead_p50_ms": round(statistics.median(overhead[id(run)]), 2),
                "step_overhead_max_ms": round(max(overhead[id(run)]), 2),
                "same_picks": run.picks == base.picks,
                "driver_received_bytes": run.received[-1],
                "driver_received_dxd": round(run.received[-1] / (8 * int(mask.numel()) ** 2), 3),
                "baseline_shards": shard_counts[0],
                "load_avg_1m": round(load, 2),
                "method": METHOD,
            }
            print(json.dumps(out), flush=True)
            results.append(out)
    finally:
        for run in runs:
            run.pool.close()
        if own_ray:
            ray.shutdown()
    return results


if __name__ == "__main__":
    if not all(r["same_picks"] for r in main()):
        raise SystemExit("picks differ across shard counts")
