"""Peak memory of one FisherMask query against its floor, F and M^-1 (2 d^2 float64).

    python -m benchmarks.driver_peak [--n 96] [--labeled 10] [--k 10] [--sparsity 0.001] [--side 32]

issue 16's case: `torchvision.models.resnet18(num_classes=10)` at sparsity 0.001 (d = 11,182), a
pool of 96 seeded random 3 x side x side images, `fm_ray.select` on the local backend (the shard
runs in this process, so its embeddings and partial sums count too). Runs the query in a child
process and prints one JSON line: d, floor_bytes, start_rss (just before the query), peak_rss,
above_start = peak - start, ratio = above_start / floor (target: at most 1.5), plan_bytes (the
memory plan's peak for the process) and plan_ratio = plan_bytes / above_start.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import numpy as np, torch, torchvision
import fm_ray
from fm_ray.config import StrategyConfig
from fm_ray.strategies.memory import plan_inputs, query_plan

n, n_lab, k, sparsity, side = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = torchvision.models.resnet18(num_classes=10).eval()
pool = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))
labeled = {i: 0 for i in range(n_lab)}
cfg = StrategyConfig(name="fishermask", sparsity=sparsity)
x = plan_inputs(model, 10, n, 1, np.arange(n_lab), k, cfg, "cpu", True, None, (3, side, side))
plan = query_plan(x)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
start = rss()
sel = fm_ray.select(model, pool, k, labeled=labeled, strategy="fishermask", device="cpu", sparsity=sparsity)
peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]) * 1024  # not ru_maxrss: it starts at the forking parent's peak
d = sel.info["mask_size"]
floor = 2 * d * d * 8
print(json.dumps({"d": d, "floor_bytes": floor, "start_rss": start, "peak_rss": peak, "above_start": peak - start,
                  "ratio": (peak - start) / floor, "plan_bytes": plan.peak("driver", "ram"),
                  "plan_ratio": plan.peak("driver", "ram") / (peak - start), "timings": sel.timings}))
"""


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--labeled", type=int, default=10)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--sparsity", type=float, default=0.001)
    p.add_argument("--side", type=int, default=32)
    a = p.parse_args(argv)
    args = [str(v) for v in (a.n, a.labeled, a.k, a.sparsity, a.side)]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
