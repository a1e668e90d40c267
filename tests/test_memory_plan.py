"""The memory plan: its figures against the peak RSS a real selection reaches (in a child process),
the refusal before any work when a plan does not fit, and the free-memory readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fm_ray._internal.resources import cgroup_free_bytes, meminfo_available_bytes
from fm_ray.cli import main
from fm_ray.core.memory import shortfall

ROOT = Path(__file__).resolve().parents[1]

# a child process: a seeded CNN and pool, the plan of one fm_ray.select, then the select itself;
# prints the plan's driver peak and the RSS growth (peak RSS - RSS just before the select, after a warm-up)
CHILD = r"""
import json, resource, sys
import numpy as np, torch
import fm_ray
from fm_ray.config import ModelConfig, StrategyConfig
from fm_ray.model.zoo import build_model
from fm_ray.strategies.memory import plan_inputs, query_plan

n, k, opts = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(1)
model = build_model(ModelConfig("cnn"), 1, 28, 10).eval()
pool = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
labeled = {int(i): 0 for i in range(0, n, n // 10)}
cfg = StrategyConfig(name="fishermask", **opts)
x = plan_inputs(model, 10, n, 1, np.array(sorted(labeled)), k, cfg, "cpu", True, None, (1, 28, 28))
plan = query_plan(x).peak("driver", "ram")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
# warm-up: the same code path at a tiny size, so torch's lazily loaded code and buffers are in
# the start figure, not in the growth the plan is compared with
fm_ray.select(model, pool[:64], 2, labeled={0: 0}, strategy="fishermask", device="cpu", sparsity=0.001)
start = rss()
fm_ray.select(model, pool, k, labeled=labeled, strategy="fishermask", device="cpu", **opts)
peak = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]) * 1024  # not ru_maxrss: it starts at the forking parent's peak
print(json.dumps({"plan": plan, "grew": peak - start, "start": start, "peak": peak}))
"""


# glibc's mmap threshold fixed in a child: left dynamic, it rises after large frees and the heap
# then keeps freed blocks, so the growth would depend on the order of frees rather than on what is alive
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def child_json(code: str, *argv: str, fixed_mmap: bool = False, timeout: int = 900) -> dict:
    """Run `code` in a fresh interpreter (with `FIXED_MMAP` if asked); the JSON of its last stdout line."""
    env = {**os.environ, **FIXED_MMAP} if fixed_mmap else None
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=timeout,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(n: int, k: int, **opts) -> dict:
    return child_json(CHILD, str(n), str(k), json.dumps(opts))


@pytest.mark.parametrize(
    "n, k, opts",
    [
        (256, 4, {"sparsity": 0.08}),  # d = 5,750: F and M^-1 (Woodbury start) dominate
        (2048, 4, {"sparsity": 0.02, "embed_dtype": "float32"}),  # d = 1,438: embeddings and their chunks
    ],
)
def test_plan_is_within_25_percent_of_the_measured_peak(n, k, opts):
    got = measure(n, k, **opts)
    assert 0.75 * got["grew"] <= got["plan"] <= 1.25 * got["grew"], got


# kcenter and BADGE through fm_ray.select on a seeded CNN and uint8 pool: the plan's driver peak
# (the local shard's items: pixels, cached predictions, the forward pass, the state) against the
# RSS growth of each query, VmHWM reset before it (clear_refs), glibc's mmap threshold fixed
# (`FIXED_MMAP`) (10 s of CPU).
DIVERSITY_CHILD = r"""
import json, resource, sys
import numpy as np, torch
import fm_ray
from fm_ray.config import ModelConfig, StrategyConfig
from fm_ray.model.zoo import build_model
from fm_ray.strategies.memory import pixels_of, plan_inputs, query_plan

n, k = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
torch.set_num_threads(1)
model = build_model(ModelConfig("cnn"), 1, 28, 10).eval()
pool = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
labeled = {int(i): 0 for i in range(0, n, n // 50)}
out = {}
for name in ("kcenter", "badge"):
    fm_ray.select(model, pool[:300], 2, labeled={0: 0}, strategy=name, device="cpu")  # warm-up
    cfg = StrategyConfig(name=name)
    x = plan_inputs(model, 10, n, 1, np.array(sorted(labeled)), k, cfg, "cpu", True, pixels=pixels_of(pool))
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := RSS now
    start = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    fm_ray.select(model, pool, k, labeled=labeled, strategy=name, device="cpu")
    peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) * 1024
    out[name] = {"plan": query_plan(x).peak("driver", "ram"), "grew": peak - start}
print(json.dumps(out))
"""


def test_diversity_plans_are_within_25_percent_of_the_measured_peak():
    for name, got in child_json(DIVERSITY_CHILD, "8192", "10", fixed_mmap=True).items():
        assert 0.75 * got["grew"] <= got["plan"] <= 1.25 * got["grew"], (name, got)


def test_a_run_that_does_not_fit_exits_2_before_training(tmp_path, capsys):
    # ResNet-18 at sparsity 0.05: d = 559,000, F alone 2.5 TB; refused before any round is trained
    argv = ["run", "--strategy", "fishermask", "--model", "resnet18", "--sparsity", "0.05", "--backend", "local"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--init", "20", "--batch", "10", "--rounds", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "largest item is" in err and "--sparsity" in err
    assert not (tmp_path / "run" / "rounds.parquet").exists()
    assert main([*argv, "--out", str(tmp_path / "dry"), "--dry-run"]) == 2  # the dry run says so too
    assert "F (pool Fisher)" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--strategy", "fishermask", "--model", "cnn", "--backend", "ray", "--shards", "2"]
    assert main([*argv, "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "Fisher embeddings" in text and "M^-1" in text and "each of 2 shards" in text and "fits:" in text
    assert "pixels held in RAM (members x 1x28x28 x 1 B)" in text and "largest process: the shard" in text
    assert not out.exists()


def test_select_refuses_a_plan_beyond_free_ram(monkeypatch):
    import torch

    import fm_ray
    from fm_ray.errors import UserError
    from fm_ray.strategies import memory

    monkeypatch.setattr(memory, "free_ram_bytes", lambda: 100_000)  # entropy's predictions and pixels fit
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    with pytest.raises(UserError, match="largest item is"):
        fm_ray.select(model, torch.rand(40, 1, 4, 4), 2, labeled={0: 1}, strategy="bait")
    assert len(fm_ray.select(model, torch.rand(40, 1, 4, 4), 2, labeled={0: 1}, strategy="entropy").ids) == 2


def test_free_memory_readers(tmp_path):
    (tmp_path / "memory.max").write_text("1000000\n")
    (tmp_path / "memory.current").write_text("250000\n")
    assert cgroup_free_bytes(str(tmp_path)) == 750000
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_free_bytes(str(tmp_path)) is None
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   12000000 kB\n")
    assert meminfo_available_bytes(str(info)) == 12000000 * 1024


def million_plan(name: str, **opts):
    """The plan of a query on a hypothetical packed FashionMNIST pool of 1M samples (1,000 labeled,
    K = 100) on 2 Ray shards, the CNN: no pool is opened, only its sizes."""
    import numpy as np

    from fm_ray.config import ModelConfig, StrategyConfig
    from fm_ray.model.zoo import build_model
    from fm_ray.strategies import Pixels
    from fm_ray.strategies.memory import plan_inputs, query_plan

    model = build_model(ModelConfig("cnn"), 1, 28, 10)
    labeled = np.arange(0, 1_000_000, 1000)
    cfg = StrategyConfig(name=name, **opts)
    x = plan_inputs(model, 10, 1_000_000, 2, labeled, 100, cfg, "cpu", False, pixels=Pixels((1, 28, 28)))
    plan = query_plan(x)
    return plan, {it.name: it.nbytes for it in plan.items}, x


def test_a_million_sample_plan_item_by_item():
    # pool.partition(1M, 2, 256): 1,953 and 1,954 blocks, 499,968 and 500,032 members; 500 labeled each
    N, free, C, E, pixels = 500_032, 500_032 - 500, 10, 128, 28 * 28
    _, items, x = million_plan("random")
    assert items == {"member positions and labeled flags": N * 9, "unlabeled positions and their draw": 999_000 * 16}
    plan, items, x = million_plan("margin")
    assert x.shard_members == [499_968, 500_032] and x.largest_output == 16 * 28 * 28  # the first conv's output
    streamed = {
        "member positions and labeled flags": N * 9,
        "cached predictions (probs + features)": N * (C + E) * 4,
        "one block's forward pass": 256 * 2 * 16 * 28 * 28 * 4,
        "one decoded row group": 1024 * pixels,  # not the shard's 392 MB of pixels
        "one block of pixels and normalized inputs": 256 * pixels * (1 + 4),
    }
    assert items == {**streamed, "unlabeled members' probabilities, scores and their sort": free * (C * 4 + 36)}
    scoring = N * 9 + N * (C + E) * 4 + free * (C * 4 + 36)  # predictions made, then scored and sorted
    assert plan.largest_process() == ("shard", "ram", scoring)  # above the forward pass's phase now
    short = shortfall(plan, {("shard", "ram"): 250_000_000})  # a score strategy is refused with its own fix
    assert short is not None and "largest item is cached predictions" in short and "more --shards" in short
    _, items, _ = million_plan("kcenter")
    assert items["k-center state (distances, chosen and eligible flags)"] == N * (4 + 2)  # no copy of the features
    assert items["a step's block temporaries"] == 2**22 * 4 + 32_768 * 32
    assert "the rows' features (a copy)" not in items
    _, items, _ = million_plan("kcenter", candidates=20_000)
    assert items["k-center state (distances, chosen and eligible flags)"] == 20_000 * (4 + 2 + 8)
    assert items["the rows' features (a copy)"] == 20_000 * E * 4
    _, items, _ = million_plan("badge")
    assert items["BADGE state (g, |g|^2, |h|^2, D^2, flags)"] == N * (C * 4 + 3 * 8 + 2)
    assert items["a step's block temporaries"] == (2**20 // (C + E)) * ((C + E) * 8 + E * 8 + 96)
    exact, items, x = million_plan("fishermask")
    d = round(0.002 * x.n_params)
    assert items["Fisher embeddings"] == free * C * d * 4 and items["cached predictions (probs + features)"]
    approx, items, _ = million_plan("fishermask", fisher_pool=20_000, candidates=20_000)
    assert items["Fisher embeddings"] == 20_000 * C * d * 4  # the F sample is summed, never stored
    assert approx.peak("shard", "ram") < exact.peak("shard", "ram") < 24e9  # both fit a 24 GB machine


# the finite check over a shard's cached predictions (every strategy that uses the model runs it):
# its growth beyond the predictions themselves, VmHWM reset after they are made. Over the whole
# shard at once, isfinite's temporaries (abs among them) were ~2x the features: at 1M samples on
# 2 shards that was the shard's peak, 0.5 GB above its plan (benchmarks.million).
CHECK_CHILD = r"""
import json
import numpy as np, torch
from fm_ray.config import ModelConfig
from fm_ray.data.normalize import Normalizer
from fm_ray.pool.shard import PoolShard, ShardSpec, nonfinite_outputs

torch.manual_seed(0)
torch.set_num_threads(1)
n = 20000
pool = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
shard = PoolShard(ShardSpec(ModelConfig("cnn"), 1, 28, 10, Normalizer((0.5,), (0.25,)), "cpu"), pool, np.arange(n))
probs, feats = shard.predictions()
nonfinite_outputs(shard)  # warm-up: lazily loaded code is not growth
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := RSS now
rss = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
start = rss("VmRSS:")
bad = nonfinite_outputs(shard)
print(json.dumps({"bad": bad, "grew": rss("VmHWM:") - start, "preds": (probs.numel() + feats.numel()) * 4}))
"""


def test_the_finite_check_over_a_shards_predictions_holds_no_copy_of_them():
    got = child_json(CHECK_CHILD, fixed_mmap=True, timeout=600)  # growth = what is alive
    assert got["bad"] == 0 and got["preds"] > 10e6, got
    assert got["grew"] < 0.25 * got["preds"], got


# one fast greedy step (a Woodbury update and the ranking) on a state of 100,000 candidates: its
# growth beyond the state, against the plan's "greedy step temporaries" item. Over all candidates
# at once a step made ~6 temporaries of the state's size (2.4 GB on a 1M pool's shard).
STEP_CHILD = r"""
import json
import torch
from fm_ray.core.greedy import GreedyState, GreedyUpdate
from fm_ray.core.memory import GreedySizes, greedy_plan

torch.manual_seed(0)
torch.set_num_threads(1)
S, C, d = 100000, 10, 8
state = GreedyState(torch.randn(S, C, d), torch.arange(S))
state.init(torch.eye(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64), 0.5)
update = GreedyUpdate(7, 1.0, torch.randn(d, C) * 0.1, torch.randn(d, C) * 0.1, torch.eye(C) * 0.5, torch.eye(C) * 0.1)
state.step(update, False)  # warm-up: lazily loaded code is not growth
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := RSS now
rss = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
start = rss("VmRSS:")
state.step(update, False)
state.step(update, True)
plan = greedy_plan(GreedySizes(d=d, C=C, shard_free=S, n_labeled=0, k=5, rows=C, width=d), 1, False)
item = next(it.nbytes for it in plan.items if it.name.startswith("greedy step temporaries"))
print(json.dumps({"grew": rss("VmHWM:") - start, "item": item, "state": 2 * S * C * C * 8}))
"""


def test_a_fast_greedy_step_grows_by_its_planned_block_not_by_the_state():
    got = child_json(STEP_CHILD, fixed_mmap=True, timeout=600)  # growth = what is alive
    assert got["item"] < got["state"] / 2, got  # one block of candidates, not all of them
    assert 0.5 * got["item"] <= got["grew"] <= 1.25 * got["item"], got
