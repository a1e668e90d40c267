"""The Ray pool: same picks as the local pool for 1, 2 and 3 shard actors; a killed shard actor is
restarted and replayed; unsatisfiable resources fail fast; a run end to end under Ray."""

import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from ray.exceptions import RayActorError

from fm_ray.config import PoolConfig
from fm_ray.core.greedy import GreedyState
from fm_ray.errors import UserError
from fm_ray.pool.local import LocalPool
from fm_ray.pool.ray_pool import RayPool
from fm_ray.pool.shard import on_state, pid, set_round
from fm_ray.strategies import STRATEGIES

pytestmark = pytest.mark.ray
CHECKED = ["entropy", "fishermask", "bait", "kcenter", "badge", "typiclust", "probcover", "galaxy"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=3, num_gpus=0, include_dashboard=False, log_to_driver=False)  # shards on CPU, GPU or not
    yield
    ray.shutdown()


def select_all(pool, trained, strategies=CHECKED) -> dict[str, list[int]]:
    out = {}
    for name in strategies:
        pool.map(set_round, trained["weights"], trained["labeled"])
        out[name] = STRATEGIES[name].select(pool, trained["context"](name)).indices
    return out


@pytest.fixture(scope="module")
def local_picks(trained):
    return select_all(LocalPool(trained["spec"], trained["x_pool"], 1), trained)


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_ray_shards_pick_like_local(trained, local_picks, shards):
    pool = RayPool(PoolConfig(backend="ray", shards=shards), trained["spec"], trained["x_pool"])
    try:
        assert pool.n_shards == shards
        assert select_all(pool, trained) == local_picks
    finally:
        pool.close()


def wait_until_gone(actor, token) -> None:
    """Block until incarnation `token` of the actor no longer answers: it refuses calls, or a
    restarted one answers. ray.kill is asynchronous, so a call sent right after it may still be
    answered by the old process. A wait on a state, not a time; the ceiling only stops a hang."""
    deadline = time.monotonic() + 600
    while True:
        try:
            if ray.get(actor.token.remote()) != token:
                return
        except RayActorError:
            return
        assert time.monotonic() < deadline, "ray.kill did not end the actor"
        time.sleep(0.05)


def test_killed_shard_is_restarted_and_round_completes(trained, local_picks):
    pool = RayPool(PoolConfig(backend="ray", shards=2), trained["spec"], trained["x_pool"])
    steps = {"n": 0}
    original = pool.map

    def map_and_kill(fn, *args):
        if fn is on_state and args[1] is GreedyState.step:
            steps["n"] += 1
            if steps["n"] == 3:  # mid-selection: shard 1 dies holding its greedy state
                ray.kill(pool.actors[1], no_restart=False)
                wait_until_gone(pool.actors[1], pool._incarnation[1])
        return original(fn, *args)

    pool.map = map_and_kill
    try:
        pids = original(pid)
        assert select_all(pool, trained, ["fishermask"]) == {"fishermask": local_picks["fishermask"]}
        assert pool.restarts >= 1
        assert original(pid)[1] != pids[1]  # really a new process
    finally:
        pool.close()


def process_env(pid_: int) -> dict[str, str]:
    """The environment a process started with (Linux)."""
    raw = Path(f"/proc/{pid_}/environ").read_bytes().decode(errors="replace")
    return dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/<pid>/environ")
def test_shard_actors_start_with_the_compute_environment_the_users_value_kept(trained, monkeypatch):
    """torch reads THP_MEM_ALLOC_ENABLE at a process's first allocation: the shard actors (this
    module's Ray was started by ray.init itself, not by fm_ray) start with it, or with the user's."""
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)  # the machine's own setting aside
    for preset, want in ((None, "1"), ("0", "0")):
        if preset is not None:
            monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", preset)
        pool = RayPool(PoolConfig(backend="ray", shards=2), trained["spec"], trained["x_pool"])
        try:
            assert [process_env(p).get("THP_MEM_ALLOC_ENABLE") for p in pool.map(pid)] == [want, want]
        finally:
            pool.close()


def test_unsatisfiable_resources_fail_fast(trained):
    with pytest.raises(UserError, match="cannot host 2 shards: needs .*GPU"):
        RayPool(PoolConfig(backend="ray", shards=2, gpus_per_shard=1), trained["spec"], trained["x_pool"])
    with pytest.raises(UserError, match="cannot host 1 shards: needs .*CPU"):
        RayPool(PoolConfig(backend="ray", shards=1, cpus_per_shard=64), trained["spec"], trained["x_pool"])


def test_run_end_to_end_on_two_ray_shards_equals_local(tmp_path):
    from fm_ray.cli import main

    args = ["run", "--dataset", "fashion_mnist", "--class-counts", "0:60,1:300,2:60", "--model", "cnn",
            "--strategy", "fishermask", "--init", "20", "--batch", "10", "--rounds", "2", "--epochs", "1",
            "--seed", "0", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--backend", "ray", "--shards", "2", "--out", str(tmp_path / "ray")]) == 0
    assert main([*args, "--backend", "local", "--out", str(tmp_path / "local")]) == 0
    from fm_ray.run.rundir import TIMING_COLUMNS

    def rows(d, name):
        skip = {*TIMING_COLUMNS, "backend", "shards"}
        return [{k: v for k, v in r.items() if k not in skip} for r in pq.read_table(tmp_path / d / name).to_pylist()]

    for name in ("rounds.parquet", "queries.parquet"):
        assert rows("ray", name) == rows("local", name)
    ray_rows = pq.read_table(tmp_path / "ray" / "rounds.parquet").to_pylist()
    assert ray_rows[0]["backend"] == "ray" and ray_rows[0]["selection_state_bytes"] > 0
    for row in ray_rows:  # peak memory so far: the shard actors' own processes, no GPU in this Ray instance
        assert row["driver_peak_rss_mb"] > 100 and row["shard_peak_rss_mb"] > 100 and row["shard_peak_gpu_mb"] is None
    local_rows = pq.read_table(tmp_path / "local" / "rounds.parquet").to_pylist()
    assert all(0 < r["shard_peak_rss_mb"] <= r["driver_peak_rss_mb"] for r in local_rows)  # in-process shards


def test_run_interrupted_between_rounds_resumes_under_ray(tmp_path):
    from fm_ray.config import DataConfig, PoolConfig, RunConfig, StrategyConfig, TrainConfig
    from fm_ray.run.recipe import run_experiment
    from fm_ray.run.rundir import TIMING_COLUMNS

    cfg = RunConfig(
        data=DataConfig(dataset="fashion_mnist", setting="custom", class_counts=((0, 60), (1, 300), (2, 60))),
        train=TrainConfig(epochs=1, device="cpu"),
        strategy=StrategyConfig(name="kcenter"),
        pool=PoolConfig(backend="ray", shards=2),
        init=20,
        batch=10,
        rounds=2,
    )

    class Stop(Exception):
        pass

    def stop_after_round_0(row):
        if row["round"] == 0:
            raise Stop

    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut", on_round=stop_after_round_0)
    run_experiment(cfg, tmp_path / "cut", resume=True)
    run_experiment(cfg, tmp_path / "full")
    for name in ("rounds.parquet", "queries.parquet"):
        a, b = (pq.read_table(tmp_path / d / name).to_pylist() for d in ("full", "cut"))
        assert [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in a] == [
            {k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in b
        ]
    assert ray.is_initialized()  # the run reused the test's Ray instance and left it up


def test_gpus_per_shard_defaults_to_the_clusters_share():
    from fm_ray.pool.ray_pool import _gpus_per_shard

    assert ray.cluster_resources().get("GPU", 0.0) == 0.0
    assert _gpus_per_shard(PoolConfig(backend="ray", shards=2)) == 0.0  # no GPU here: shards on CPU
    assert _gpus_per_shard(PoolConfig(backend="ray", shards=2, gpus_per_shard=0.25)) == 0.25


def test_partial_sums_are_added_among_the_shards(trained):
    """map_sum over 3 actors equals the sum of their answers, and the driver receives one sum."""
    import torch

    from fm_ray.core.mask import fisher_mask
    from fm_ray.strategies.fisher import build_greedy_state

    pool = RayPool(PoolConfig(backend="ray", shards=3), trained["spec"], trained["x_pool"])
    try:
        pool.map(set_round, trained["weights"], trained["labeled"])
        mask = fisher_mask(torch.arange(71850, dtype=torch.float64) % 977, 300)  # the CNN has 71,850 weights
        parts = pool.map(build_greedy_state, mask, "fast", 64, "float64", "float32")
        before = pool.received_bytes
        pool_sum, labeled_sum, count = pool.map_sum(build_greedy_state, mask, "fast", 64, "float64", "float32")
        assert pool.received_bytes - before == 2 * 300 * 300 * 8  # one pool sum and one labeled sum
        assert count == 560
        assert torch.allclose(pool_sum, sum(p for p, _, _ in parts), rtol=1e-12)
        assert torch.allclose(labeled_sum, sum(s for _, s, _ in parts), rtol=1e-12)
    finally:
        pool.close()


def test_a_small_pool_on_more_ray_shards_than_blocks_picks_like_one_local_shard(trained, capfd, caplog):
    caplog.set_level(logging.INFO, logger="fm_ray")
    """300 samples fill 2 blocks: 3 shards asked, 2 actors (was: an empty shard and torch.cat([]));
    the actors are built from plain values, so Ray's warning about constructor arguments in the
    object store (ray-project/ray#53727) never appears."""
    x, labeled = trained["x_pool"][:300], trained["labeled"][trained["labeled"] < 300]
    small = {**trained, "x_pool": x, "labeled": labeled}

    def context(name):
        ctx = trained["context"](name)
        labels = None if ctx.labels is None else ctx.labels[trained["labeled"] < 300]
        return type(ctx)(ctx.round, ctx.k, ctx.seed, labeled, 300, ctx.cfg, ctx.model, labels)

    def picks(pool):
        out = {}
        for name in CHECKED:
            pool.map(set_round, small["weights"], labeled)
            out[name] = STRATEGIES[name].select(pool, context(name)).indices
        return out

    local = picks(LocalPool(small["spec"], x, 1))
    pool = RayPool(PoolConfig(backend="ray", shards=3), small["spec"], x)
    try:
        assert pool.n_shards == 2
        assert picks(pool) == local
    finally:
        pool.close()
    captured = capfd.readouterr()
    assert "a pool of 300 samples fills 2 block(s) of 256: running 2 shard(s), not 3" in caplog.text
    assert "53727" not in captured.out + captured.err


def test_a_shard_that_cannot_be_restarted_is_one_line_with_its_peak_memory(trained, monkeypatch):
    from fm_ray.pool import ray_pool

    pool = RayPool(PoolConfig(backend="ray", shards=2), trained["spec"], trained["x_pool"])
    monkeypatch.setattr(ray_pool, "RESOURCE_WAIT_S", 1.0)  # the wait for a restart, not for the reservation
    try:
        pool.map(pid)
        ray.kill(pool.actors[1], no_restart=True)  # gone for good, as a shard in an out-of-memory loop
        wait_until_gone(pool.actors[1], pool._incarnation[1])
        with pytest.raises(
            UserError, match=r"shard 1 \(pool positions 256\.\.559\) died and could not be restarted"
        ) as e:
            pool.map(pid)
        rss = float(str(e.value).split("its peak RSS so far: ")[1].split(" MB")[0])
        assert rss > 0 and "\n" not in str(e.value)
    finally:
        pool.close()
