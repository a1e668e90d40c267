"""Picks only from a model that can rank the pool: NaN/inf outputs or every candidate scoring the
same stop the query with one line (`fm-ray run`: exit 2, earlier rounds kept; `fm_ray.select`: a
DegenerateModelError); no strategy returns a duplicate; any pool size on any shard count; the
arguments of `fm_ray.select` are checked at the boundary; a dead `--ray-address` is one line."""

import logging
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import fm_ray
from fm_ray.cli import main
from fm_ray.core.badge import KMeansPPState, badge_factors, badge_select
from fm_ray.core.greedy import local_best, local_call
from fm_ray.errors import DegenerateModelError, UserError
from fm_ray.pool import partition
from fm_ray.pool.local import LocalPool
from fm_ray.pool.shard import set_round
from fm_ray.strategies import STRATEGIES, all_equal, merge_ranges

MODEL_BASED = ["entropy", "margin", "least_confidence", "fishermask", "bait", "kcenter", "badge"]
SATURABLE = ["entropy", "margin", "least_confidence", "fishermask", "bait", "badge"]


def small_net(classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))


def pool_x(n: int = 60) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# -- the cause of BADGE's [0, 0, 0, 0, 0] --------------------------------------------------------
def test_local_best_never_answers_an_ineligible_position_for_nan_scores():
    score = torch.tensor([math.nan, math.nan, 0.5, math.nan])
    eligible = torch.tensor([False, True, False, True])
    assert local_best(score, eligible, torch.arange(4)) == 1  # was 0: chosen, not eligible
    assert local_best(torch.full((3,), math.nan), torch.tensor([False, False, True]), torch.arange(3)) == 2


def test_badge_on_nan_outputs_never_repeats_a_pick():
    g, h = badge_factors(torch.full((10, 3), math.nan), torch.randn(10, 4))
    picks = badge_select(
        local_call([KMeansPPState(g[:6], h[:6], torch.arange(6)), KMeansPPState(g[6:], h[6:], torch.arange(6, 10))]),
        5,
        0,
    )
    assert len(set(picks)) == 5  # was [0, 0, 0, 0, 0]


# -- what "all equal" means -------------------------------------------------------------------
def test_all_equal_is_relative_to_the_scale():
    assert (
        all_equal((0.0, 0.0))
        and all_equal((2.0, 2.0 + 1e-10))
        and all_equal((2.0, 2.0 + 1e-7))  # float32 roundoff of identical candidates (issue 21)
        and not all_equal((2.0, 2.0 + 1e-4))
        and all_equal((math.nan, math.nan))
    )
    assert all_equal((-math.inf, -math.inf))
    assert not all_equal((1e-30, 2e-30)) and not all_equal((0.0, 1e-9)) and not all_equal((-math.inf, 0.0))
    assert merge_ranges([None, (math.inf, -math.inf), (1.0, 2.0), (0.5, 1.5)]) == (0.5, 2.0)
    assert merge_ranges([None, (math.inf, -math.inf)]) is None


# -- fm_ray.select ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", MODEL_BASED)
def test_select_refuses_a_model_with_nan_outputs(strategy):
    net = small_net()
    with torch.no_grad():
        net[1].weight[0, 0] = math.nan
    with pytest.raises(DegenerateModelError, match="round 0: the model's outputs on the pool are not finite"):
        fm_ray.select(net, pool_x(), 5, strategy=strategy, device="cpu", shards=2)


@pytest.mark.parametrize("strategy", SATURABLE)
def test_select_refuses_a_saturated_model(strategy):
    net = small_net()
    with torch.no_grad():  # every sample: probability exactly 1 for class 0 (a diverged, saturated model)
        net[3].weight.zero_()
        net[3].bias.copy_(torch.tensor([1e3, 0.0, 0.0, 0.0]))
    with pytest.raises(DegenerateModelError, match="every candidate scores the same"):
        fm_ray.select(net, pool_x(), 5, strategy=strategy, device="cpu", labeled={0: 0, 1: 0})


def test_a_saturated_model_still_has_features_for_kcenter_and_random_needs_no_model():
    net = small_net()
    with torch.no_grad():
        net[3].weight.zero_()
        net[3].bias.copy_(torch.tensor([1e3, 0.0, 0.0, 0.0]))
    for strategy in ("kcenter", "random"):
        sel = fm_ray.select(net, pool_x(), 5, strategy=strategy, device="cpu")
        assert len(set(sel.ids)) == 5


def test_degenerate_model_error_is_an_exported_user_error():
    assert fm_ray.DegenerateModelError is DegenerateModelError and issubclass(DegenerateModelError, fm_ray.UserError)


def test_select_checks_its_arguments_at_the_boundary():
    net, x = small_net(), pool_x(20)
    cases = [
        (dict(k=2.5), TypeError, "k must be a positive int"),
        (dict(k=True), TypeError, "k must be a positive int"),
        (dict(k=0), ValueError, "k = 0"),
        (dict(k=19, labeled={0: 1, 1: 2}), ValueError, "k = 19 but 18 pool samples are unlabeled"),
        (dict(k=3, n_classes=10), ValueError, "n_classes = 10 but the model outputs 4"),
        (dict(k=3, labeled={99: 1}), ValueError, "labeled ids not in the pool: \\[99\\]"),
        (dict(k=3, labeled=[1, 2]), TypeError, "labeled must be a dict"),
        (dict(k=3, strategy="nope"), ValueError, "unknown strategy 'nope'"),
    ]
    for kwargs, kind, message in cases:
        with pytest.raises(kind, match=message):
            fm_ray.select(net, x, device="cpu", **kwargs)
    with pytest.raises(ValueError, match="pool is empty"):
        fm_ray.select(net, torch.empty(0, 1, 8, 8), 1, device="cpu")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fm_ray.select(lambda t: t, x, 1, device="cpu")
    with pytest.raises(UserError):  # and all of them are fm_ray user errors (one line in the CLI)
        fm_ray.select(net, x, 0, device="cpu")


# -- fm-ray run ---------------------------------------------------------------------------------
RUN = ["run", "--class-counts", "0:60,1:60,2:60", "--model", "cnn", "--epochs", "1", "--seed", "3", "--init", "10"]
RUN += ["--batch", "5", "--rounds", "2", "--backend", "local", "--device", "cpu", "--strategy", "entropy"]


def test_run_stops_at_the_degenerate_round_and_keeps_the_earlier_rows(tmp_path, capsys, monkeypatch):
    from fm_ray.run import recipe

    real = recipe.fit_round

    def diverges_in_round_1(*args, **kwargs):
        model, fit = real(*args, **kwargs)
        if args[3] == 1:  # the round number
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(math.nan)
        return model, fit

    monkeypatch.setattr(recipe, "fit_round", diverges_in_round_1)
    out = tmp_path / "run"
    assert main([*RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "round 1: the model's outputs on the pool are not finite" in err[0], err
    assert "lower the learning rate (--lr)" in err[0]
    assert pq.read_table(out / "rounds.parquet").column("round").to_pylist() == [0]


# -- any pool size on any shard count ---------------------------------------------------------
@pytest.mark.parametrize("n", [1, 100, 256, 257, 600])
@pytest.mark.parametrize("shards", [1, 2, 3, 8])
def test_partition_never_leaves_a_shard_empty(n, shards):
    parts = partition(n, shards, 256)
    assert all(len(p) for p in parts) and len(parts) == min(shards, -(-n // 256))
    assert np.array_equal(np.concatenate(parts), np.arange(n))


@pytest.mark.parametrize("strategy", [*MODEL_BASED, "random"])
def test_a_small_pool_on_several_shards_picks_what_one_shard_picks(trained, strategy, caplog):
    caplog.set_level(logging.INFO, logger="fm_ray")
    x, labeled = trained["x_pool"][:200], trained["labeled"][trained["labeled"] < 200]

    def picks(shards: int) -> list[int]:
        pool = LocalPool(trained["spec"], x, shards)
        pool.map(set_round, trained["weights"], labeled)
        ctx = trained["context"](strategy)
        ctx = type(ctx)(ctx.round, ctx.k, ctx.seed, labeled, 200, ctx.cfg, ctx.model)
        return STRATEGIES[strategy].select(pool, ctx).indices

    one = picks(1)
    assert picks(3) == one and len(set(one)) == 8
    assert "a pool of 200 samples fills 1 block(s) of 256: running 1 shard(s), not 3" in caplog.text


def test_select_on_a_small_pool_with_more_shards_than_blocks():
    net, x = small_net(), pool_x(100)
    one = fm_ray.select(net, x, 5, strategy="entropy", device="cpu").ids
    assert fm_ray.select(net, x, 5, strategy="entropy", device="cpu", shards=4).ids == one  # crashed: torch.cat([])


# -- a dead --ray-address -----------------------------------------------------------------------
def test_a_dead_ray_address_is_one_line_within_60s(tmp_path):
    with socket.socket() as s:  # a loopback port where nothing listens once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, FM_RAY_CONNECT_WAIT_S="3", RAY_ADDRESS="")
    cmd = [sys.executable, "-m", "fm_ray.cli", *RUN, "--backend", "ray", "--ray-address", f"127.0.0.1:{port}"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Ray cluster at 127.0.0.1:{port} within 3s" in lines[0], lines
