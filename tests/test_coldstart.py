"""TypiClust and ProbCover (fm_ray.core.coldstart) against literal loops; `--init 0 --init-strategy`."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fm_ray.core.coldstart import delta_graph, kmeans_labels, probcover_select, typicality, typiclust_select


def blobs(n: int = 60, e: int = 3, seed: int = 0) -> torch.Tensor:
    """Four seeded Gaussian blobs of different sizes and spreads, float64."""
    g = torch.Generator().manual_seed(seed)
    centers = 4 * torch.randn(4, e, generator=g, dtype=torch.float64)
    which = torch.tensor([i % 4 if i % 3 else 0 for i in range(n)])
    spread = torch.tensor([0.3, 0.6, 1.0, 1.5], dtype=torch.float64)[which, None]
    return centers[which] + spread * torch.randn(n, e, generator=g, dtype=torch.float64)


def literal_typicality(x: list[list[float]], k: int) -> list[float]:
    out = []
    for i, a in enumerate(x):
        d = sorted(sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) for j, b in enumerate(x) if j != i)
        out.append(1 / (sum(d[:k]) / k + 1e-5))
    return out


@pytest.mark.parametrize("k", [1, 3, 20])
def test_typicality_is_the_inverse_mean_knn_distance(k: int) -> None:
    x = blobs(40)
    got = typicality(x, k, block=7)  # blocks that do not divide N
    assert got.tolist() == pytest.approx(literal_typicality(x.tolist(), k), rel=1e-9)


def test_typiclust_picks_the_most_typical_of_the_largest_unlabeled_cluster_first() -> None:
    x = blobs(60)
    labeled = torch.zeros(60, dtype=torch.bool)
    labeled[[1, 2]] = True
    picks = typiclust_select(x, labeled, 5, seed=3)
    assert len(set(picks)) == 5 and not set(picks) & {1, 2}
    clusters = kmeans_labels(x, 2 + 5, seed=3)
    # literal: clusters ordered by (labeled count, -size, id); the first one's most typical unlabeled member
    stats = []
    for c in sorted(set(clusters.tolist())):
        members = [i for i in range(60) if clusters[i] == c]
        stats.append((sum(labeled[i].item() for i in members), -len(members), c, members))
    stats.sort(key=lambda s: s[:3])
    stats = [s for s in stats if -s[1] > 5] or stats
    firsts = []
    for _, _, _, members in stats[:5]:
        free = [i for i in members if not labeled[i]]
        typ = literal_typicality(x[free].tolist(), max(1, min(20, len(free) // 2)))
        firsts.append(free[int(np.argmax(typ))])
    assert picks[: len(firsts)] == firsts  # one from each cluster in turn (7 clusters, >= 5 kept)


def literal_cover(x: torch.Tensor, labeled: list[bool], k: int, delta: float) -> list[int]:
    """ProbCover's greedy with explicit loops: each pick, the unlabeled sample covering the most
    samples not yet covered (lowest index among ties)."""
    x = torch.nn.functional.normalize(x, dim=1).tolist()
    n = len(x)
    near = [[math.dist(x[i], x[j]) < delta for j in range(n)] for i in range(n)]
    covered = [any(labeled[i] and near[i][j] for i in range(n)) for j in range(n)]
    taken, picks = list(labeled), []
    for _ in range(k):
        gain = [-1 if taken[i] else sum(near[i][j] and not covered[j] for j in range(n)) for i in range(n)]
        best = max(range(n), key=lambda i: (gain[i], -i))
        assert gain[best] > 0  # the test stays where coverage still grows
        picks.append(best)
        taken[best] = True
        covered = [covered[j] or near[best][j] for j in range(n)]
    return picks


def test_delta_graph_holds_exactly_the_pairs_within_delta() -> None:
    x = torch.nn.functional.normalize(blobs(30), dim=1)
    xs, ys = delta_graph(x, 0.4, block=8)
    pairs = {(i, j) for i in range(30) for j in range(30) if math.dist(x[i].tolist(), x[j].tolist()) < 0.4}
    assert set(zip(xs.tolist(), ys.tolist(), strict=True)) == pairs and len(xs) == len(pairs)


@pytest.mark.parametrize("delta", [0.1, 0.25])
def test_probcover_equals_a_literal_greedy_coverage(delta: float) -> None:
    x = blobs(50, seed=1)
    labeled = [i in (0, 7) for i in range(50)]
    picks = probcover_select(x, torch.tensor(labeled), 4, delta, torch.rand(50, dtype=torch.float64))
    assert picks == literal_cover(x, labeled, 4, delta)


def test_probcover_goes_by_the_tiebreak_once_all_is_covered() -> None:
    x = blobs(20)
    labeled = torch.zeros(20, dtype=torch.bool)
    tiebreak = torch.linspace(0.1, 0.9, 20, dtype=torch.float64)
    picks = probcover_select(x, labeled, 5, delta=2.0, tiebreak_N=tiebreak)  # one ball covers the sphere
    assert picks[0] == 0 and picks[1:] == [19, 18, 17, 16]


def test_init_0_with_typiclust_picks_round_0_with_no_labels(tmp_path, tiny_cfg) -> None:
    from fm_ray.config import PoolConfig, StrategyConfig
    from fm_ray.data.normalize import Normalizer
    from fm_ray.data.registry import open_source
    from fm_ray.data.settings import sample_pool
    from fm_ray.errors import UserError
    from fm_ray.model.train import round_seed
    from fm_ray.model.zoo import build_model
    from fm_ray.run.recipe import run_experiment
    from fm_ray.run.validate import check
    from fm_ray.session import PoolSession

    cfg = tiny_cfg(init=0, init_strategy="typiclust", rounds=1, stop_set=20)
    out = run_experiment(cfg, tmp_path / "run")
    rows = pq.read_table(out / "rounds.parquet").to_pylist()
    queries = pq.read_table(out / "queries.parquet").to_pylist()
    initial = sorted(q["pool_index"] for q in queries if q["round"] == 0)
    assert [r["n_labeled"] for r in rows] == [10, 20] and len(initial) == 10
    assert {q["round"] for q in queries} == {0, 1}
    # the strategy's picks on the seeded untrained model, here on 3 shards: the run's initial set
    data = open_source(cfg.data)
    pool = sample_pool(cfg.data, data, cfg.seed)
    torch.manual_seed(round_seed(cfg.seed, 0))
    model = build_model(cfg.model, 1, 28, 3)
    images = data.train.images.subset(pool.train_index)
    norm = Normalizer(data.mean, data.std)
    session = PoolSession(images, range(len(pool.train_index)), 3, norm, cfg.model, PoolConfig("local", shards=3))
    try:
        sel = session.select(model, 10, [], StrategyConfig(name="typiclust"), cfg.seed, 0)
    finally:
        session.close()
    assert sorted(sel.indices) == initial
    again = run_experiment(cfg, tmp_path / "run", resume=True)  # resumes with the same initial set
    assert (
        sorted(q["pool_index"] for q in pq.read_table(again / "queries.parquet").to_pylist() if q["round"] == 0)
        == initial
    )
    with pytest.raises(UserError, match="--init must be positive.*--init-strategy"):
        check(tiny_cfg(init=0))
    with pytest.raises(UserError, match="cannot pick with no labels"):
        check(tiny_cfg(init=0, init_strategy="fishermask"))


def test_features_of_a_frozen_checkpoint_pick_alike_on_1_and_3_shards(trained, tmp_path) -> None:
    from fm_ray.config import ModelConfig
    from fm_ray.model.train import predict
    from fm_ray.model.zoo import build_model
    from fm_ray.pool.local import LocalPool
    from fm_ray.pool.shard import set_round
    from fm_ray.strategies import STRATEGIES

    torch.manual_seed(5)  # a model other than the trained one: its features pick
    frozen = build_model(ModelConfig("cnn"), 1, 28, 10)
    torch.save(frozen.state_dict(), tmp_path / "frozen.pt")
    ctx = trained["context"]("typiclust", features=f"checkpoint:{tmp_path / 'frozen.pt'}")
    picks = []
    for shards in (1, 3):
        pool = LocalPool(trained["spec"], trained["x_pool"], shards)
        pool.map(set_round, trained["weights"], trained["labeled"])
        picks.append(STRATEGIES["typiclust"].select(pool, ctx).indices)
    _, feats = predict(frozen, trained["x_pool"], trained["spec"].norm, torch.device("cpu"), batch=256)
    labeled = torch.zeros(560, dtype=torch.bool)
    labeled[torch.from_numpy(trained["labeled"])] = True
    assert picks[0] == picks[1] == typiclust_select(feats, labeled, 8, seed=ctx.seed * 100_003 + ctx.round)


def test_features_flag_is_checked(tiny_cfg, tmp_path) -> None:
    import dataclasses

    from fm_ray.errors import UserError
    from fm_ray.run.validate import check

    strategy = dataclasses.replace(tiny_cfg().strategy, name="typiclust")
    for features, message in [
        ("resnet", "--features must be torchvision:<name> or checkpoint:<path>"),
        (f"checkpoint:{tmp_path / 'none.pt'}", "no such file"),
        ("torchvision:nonet", "unknown torchvision model"),
    ]:
        with pytest.raises(UserError, match=message):
            check(tiny_cfg(strategy=dataclasses.replace(strategy, features=features)))
