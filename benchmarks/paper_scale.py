"""One FisherMask query at the paper's scale, through the real shard code (no Ray needed).

ResNet-18 on 32x32x3 CIFAR-10 images, S = 5,750 pool samples (setting 1's size), C = 10, sparsity
0.002 (d = 22,350 of its 11.2M weights), K = 250 picks, 250 labeled. Prints one JSON line with the
seconds per phase (mask, embeddings, F reduce, selection) and the peak memory:

    python -m benchmarks.paper_scale --device cuda             # the target: the whole query < 30 s on one H100
    python -m benchmarks.paper_scale --scale 0.05              # S, K, labeled and d shrunk 20x: a CPU smoke run
    python -m benchmarks.paper_scale --device cuda --dataset fashion_mnist --data-dir data/   # grey 28x28 images

The model is trained for `--epochs` on the labeled set first, so the probabilities are not uniform.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from benchmarks.timing import timed
from fm_ray.config import DataConfig, ModelConfig, PoolConfig, StrategyConfig, TrainConfig
from fm_ray.data.normalize import Normalizer
from fm_ray.data.registry import open_source
from fm_ray.data.source import TensorImages
from fm_ray.errors import UserError
from fm_ray.model.train import fit_round
from fm_ray.pool.shard import peak_rss_mb
from fm_ray.session import PoolSession

PAPER = {"S": 5750, "K": 250, "labeled": 250, "sparsity": 0.002}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scale", type=float, default=1.0, help="shrink S, K, labeled and d by this factor")
    p.add_argument("--shards", type=int, default=1, help="in-process shards (the picks do not depend on it)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--embed-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--dataset",
        default="cifar10",
        help="cifar10 (the paper's) or any --dataset fm-ray takes, e.g. fashion_mnist (30 MB of raw files, "
        "small enough to carry to a GPU machine); the first S training images are the pool",
    )
    p.add_argument("--data-dir", default=None, help="dataset root (else $FM_RAY_DATA, else the cache)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    S, K, n_lab = (max(2, round(PAPER[k] * a.scale)) for k in ("S", "K", "labeled"))
    sparsity = PAPER["sparsity"] * a.scale
    device = torch.device(a.device)

    data = open_source(DataConfig(dataset=a.dataset, data_dir=a.data_dir))
    x_S, y_S = data.train_x[:S], data.train_y[:S]
    labeled = np.sort(np.random.default_rng(a.seed).choice(S, size=n_lab, replace=False))
    norm = Normalizer(data.mean, data.std)
    lab = torch.from_numpy(labeled)
    model, _ = fit_round(
        ModelConfig("resnet18"), TrainConfig(epochs=a.epochs), a.seed, 0, x_S[lab], y_S[lab], norm, False, 10, device
    )
    cfg = StrategyConfig(name="fishermask", sparsity=sparsity, embed_dtype=a.embed_dtype)
    session = PoolSession(
        TensorImages(x_S), list(range(S)), 10, norm, ModelConfig("resnet18"), PoolConfig("local", a.shards), a.device
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        total, sel = timed(a.device, lambda: session.select(model, K, labeled.tolist(), cfg, a.seed))
    finally:
        session.close()
    t = sel.timings
    row = {
        "bench": "paper_scale",
        "dataset": a.dataset,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "scale": a.scale,
        "S": S,
        "K": K,
        "labeled": n_lab,
        "d": sel.info.get("mask_size"),
        "shards": a.shards,
        "embed_dtype": a.embed_dtype,
        "mask_s": round(t.get("mask_seconds", float("nan")), 3),
        "embed_s": round(t.get("embed_seconds", float("nan")) - t.get("reduce_seconds", 0.0), 3),
        "reduce_s": round(t.get("reduce_seconds", float("nan")), 3),
        "select_s": round(t.get("select_seconds", float("nan")), 3),
        "total_s": round(total, 3),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "picks": len(sel.indices),
    }
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # e.g. no CIFAR-10 under --data-dir / $FM_RAY_DATA: one line, exit 2
        print(f"paper_scale: error: {e}", file=sys.stderr)
        sys.exit(2)
