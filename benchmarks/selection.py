"""Greedy Fisher selection: literal eq. 12 (reference) vs. incremental C x C state (fast).

    python -m benchmarks.selection --S 2000 --C 10 --d 1024 --K 50 [--device cpu|cuda]
        [--dtype float32|float64] [--seed 0]

Prints one JSON line. Both methods get the same seeded inputs and run on a single shard.
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.timing import timed
from fm_ray.core.greedy import GreedyState, greedy_select, local_call


def inputs(S: int, C: int, d: int, n_labeled: int, seed: int, device: str, dtype: torch.dtype):
    """Random embeddings; F = mean V^T V over candidates; labeled sum from a few extra samples."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(S + n_labeled, C, d, generator=g, dtype=torch.float64)
    V = V * (0.2 + 2 * torch.rand(S + n_labeled, 1, 1, generator=g, dtype=torch.float64))
    cand, lab = V[:S].reshape(-1, d), V[S:].reshape(-1, d)
    F = cand.T @ cand / S
    S_L = lab.T @ lab
    return (t.to(device=device, dtype=dtype) for t in (V[:S], F, S_L))


def run(method: str, V, F, S_L, K: int, n_labeled: int, device: str) -> tuple[list[int], float]:
    def select() -> list[int]:
        state = GreedyState(V, torch.arange(V.shape[0], device=device), method=method)
        return greedy_select(local_call([state]), F, K, n_labeled=n_labeled, labeled_sum_D_D=S_L)

    seconds, picks = timed(device, select)
    return picks, seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--S", type=int, default=2000)
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--n-labeled", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    for method in ("fast", "reference"):  # warm-up: lazy LAPACK/CUDA initialisation is not selection time
        run(method, *inputs(8, a.C, 16, 2, a.seed, a.device, dtype), 2, 2, a.device)
    V, F, S_L = inputs(a.S, a.C, a.d, a.n_labeled, a.seed, a.device, dtype)
    fast, fast_s = run("fast", V, F, S_L, a.K, a.n_labeled, a.device)
    ref, ref_s = run("reference", V, F, S_L, a.K, a.n_labeled, a.device)
    out = {
        "bench": "selection",
        "S": a.S,
        "C": a.C,
        "d": a.d,
        "K": a.K,
        "device": a.device,
        "dtype": a.dtype,
        "same_picks": fast == ref,
        "reference_s": round(ref_s, 3),
        "fast_s": round(fast_s, 3),
        "speedup": round(ref_s / fast_s, 2),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
