"""BALD, BatchBALD and stochastic batches against brute force; MC draws and picks on 1 and 3 shards.

The brute forces are literal: BALD's two entropies as float64 loops, BatchBALD's joint entropy by
enumerating every labeling of the batch, its picks by a greedy over that enumeration, and the
stochastic batches' first pick frequencies against ``softmax(base)`` by a chi-square test."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fm_ray.core.bayes import (
    BatchBALDState,
    JointBuilder,
    bald_scores,
    batchbald_greedy,
    batchbald_select,
    dropout_masks,
    mc_log_probs,
)
from fm_ray.core.greedy import local_call
from fm_ray.core.scores import top_k
from fm_ray.core.stochastic import stochastic_keys


def draws(seed: int, N: int, T: int, C: int, sharp: float = 2.0) -> torch.Tensor:
    """Seeded MC log-probabilities: per-sample logits plus per-draw noise, float64."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, 1, C, generator=g, dtype=torch.float64) * sharp
    noise = torch.randn(N, T, C, generator=g, dtype=torch.float64) * torch.rand(
        N, 1, 1, generator=g, dtype=torch.float64
    )
    return (base + 2 * noise).log_softmax(-1)


def brute_bald(lp: torch.Tensor) -> list[float]:
    N, T, C = lp.shape
    out = []
    for n in range(N):
        mean = [sum(math.exp(lp[n, t, c]) for t in range(T)) / T for c in range(C)]
        h_mean = -sum(m * math.log(m) for m in mean if m > 0)
        h_each = 0.0
        for t in range(T):
            h_each -= sum(math.exp(lp[n, t, c]) * float(lp[n, t, c]) for c in range(C)) / T
        out.append(h_mean - h_each)
    return out


def brute_joint_entropy(lp: torch.Tensor, batch: list[int]) -> float:
    """H[y_batch] = -sum over every labeling y of p(y) log p(y), p(y) = mean_t prod_i p_t(y_i)."""
    N, T, C = lp.shape
    p = lp.exp()
    h = 0.0
    for labels in itertools.product(range(C), repeat=len(batch)):
        q = sum(math.prod(float(p[i, t, y]) for i, y in zip(batch, labels, strict=True)) for t in range(T)) / T
        h -= q * math.log(q) if q > 0 else 0.0
    return h


def brute_batchbald(lp: torch.Tensor, k: int) -> list[int]:
    N, T, C = lp.shape
    cond = [-sum(math.exp(lp[n, t, c]) * float(lp[n, t, c]) for t in range(T) for c in range(C)) / T for n in range(N)]
    chosen: list[int] = []
    for _ in range(k):
        best, best_score = -1, -math.inf
        for n in range(N):
            if n in chosen:
                continue
            score = brute_joint_entropy(lp, [*chosen, n]) - sum(cond[i] for i in [*chosen, n])
            if score > best_score:
                best, best_score = n, score
        chosen.append(best)
    return chosen


def test_bald_equals_its_definition():
    lp = draws(0, 12, 5, 4)
    lp[3] = lp[3, :1]  # every draw the same: no mutual information
    assert np.allclose(bald_scores(lp).numpy(), brute_bald(lp), atol=1e-12)
    assert float(bald_scores(lp)[3]) == 0.0 and bool((bald_scores(lp) >= 0).all())


def test_bald_handles_zero_probabilities_without_nan():
    lp = torch.log(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64))  # -inf entries
    assert torch.allclose(bald_scores(lp), torch.tensor([math.log(2)], dtype=torch.float64))


def test_batchbald_scores_equal_the_enumerated_joint_mutual_information():
    lp = draws(1, 7, 4, 3)
    T = 4
    cond = [-float((lp[n].exp() * lp[n]).sum()) / T for n in range(7)]
    state = BatchBALDState(lp, torch.arange(7), torch.ones(7, dtype=torch.bool))
    joint = JointBuilder(num_samples=10_000, seed=0)
    for i in (2, 5):
        joint.add(lp[i])
    state.eligible_N[[2, 5]] = False
    got = state.scores(joint.message(5))
    for n in (0, 1, 3, 4, 6):
        want = brute_joint_entropy(lp, [2, 5, n]) - cond[2] - cond[5] - cond[n]
        assert abs(float(got[n]) - want) < 1e-10
    assert got[2] == -math.inf and got[5] == -math.inf


def test_batchbald_picks_equal_a_literal_greedy_and_batch_one_is_balds_argmax():
    lp = draws(2, 9, 3, 3)
    assert batchbald_select(lp, 4, num_samples=10_000, seed=0) == brute_batchbald(lp, 4)
    for seed in range(3):
        lp = draws(10 + seed, 30, 6, 5)
        assert batchbald_select(lp, 1, num_samples=10_000, seed=0) == [int(bald_scores(lp).argmax())]


def test_sampled_joint_entropy_is_seeded_and_close_to_exact():
    lp = draws(3, 20, 8, 4, sharp=1.0)
    batch = [0, 1, 2, 3]  # 4^4 = 256 labelings: exact at 256 samples and above, sampled below
    exact, sampled = JointBuilder(10_000, seed=5), JointBuilder(200, seed=5)
    again, other = JointBuilder(200, seed=5), JointBuilder(200, seed=6)
    for b in (exact, sampled, again, other):
        for i in batch:
            b.add(lp[i])
    assert not exact.sampled and sampled.sampled
    state = BatchBALDState(lp, torch.arange(20), torch.ones(20, dtype=torch.bool))
    s_exact = state.scores(exact.message(3))[4:]
    s_sampled = state.scores(sampled.message(3))[4:]
    assert torch.equal(s_sampled, state.scores(again.message(3))[4:])
    assert not torch.equal(s_sampled, state.scores(other.message(3))[4:])
    assert float((s_sampled - s_exact).abs().max()) < 0.1 * float(s_exact.abs().max())
    picks = batchbald_select(lp, 6, num_samples=50, seed=1)
    assert picks == batchbald_select(lp, 6, num_samples=50, seed=1) and len(set(picks)) == 6


@pytest.mark.parametrize(("num_samples", "chunk_bytes"), [(10_000, None), (40, None), (40, 1 << 15)])
def test_batchbald_on_shards_equals_the_whole_pool(num_samples, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:  # score chunks of a few rows (what a large joint gets), still aligned
        monkeypatch.setattr("fm_ray.core.bayes.CHUNK_BYTES", chunk_bytes)
    lp = draws(4, 1100, 5, 4).float()  # shards cut on 256-sample blocks, as the pool cuts them
    eligible = torch.rand(1100, generator=torch.Generator().manual_seed(0)) > 0.2
    whole = [BatchBALDState(lp, torch.arange(1100), eligible)]
    cuts = [0, 256, 768, 1100]
    parts = [BatchBALDState(lp[a:b], torch.arange(a, b), eligible[a:b]) for a, b in itertools.pairwise(cuts)]
    want = batchbald_greedy(local_call(whole), 5, num_samples=num_samples, seed=3)
    assert batchbald_greedy(local_call(parts), 5, num_samples=num_samples, seed=3) == want
    assert all(eligible[i] for i in want)


def test_dropout_masks_are_seeded_and_drop_about_p():
    m = dropout_masks(7, 20, 500, 0.3)
    assert torch.equal(m, dropout_masks(7, 20, 500, 0.3)) and not torch.equal(m, dropout_masks(8, 20, 500, 0.3))
    assert torch.allclose(m.unique(), torch.tensor([0.0, 1 / 0.7]))
    assert abs(float((m == 0).double().mean()) - 0.3) < 0.02
    feats, w, b = torch.randn(4, 500), torch.randn(3, 500), torch.randn(3)
    lp = mc_log_probs(feats, w, b, m)
    want = torch.stack([((feats * m[t]) @ w.T + b).log_softmax(-1) for t in range(20)], 1)
    assert torch.allclose(lp, want, atol=1e-5)


def first_pick_counts(scores: torch.Tensor, mode: str, beta: float, trials: int) -> np.ndarray:
    index = torch.arange(len(scores))
    counts = np.zeros(len(scores))
    for seed in range(trials):
        _, picked = top_k(stochastic_keys(scores, index, mode, beta, seed, round=3), index, 1)
        counts[int(picked[0])] += 1
    return counts


@pytest.mark.parametrize(
    ("mode", "beta", "base"),
    [
        ("power", 1.0, lambda s, r: np.log(s)),
        ("power", 2.5, lambda s, r: 2.5 * np.log(s)),
        ("softmax", 3.0, lambda s, r: 3.0 * s),
        ("softrank", 1.0, lambda s, r: -np.log(r)),
    ],
)
def test_stochastic_first_picks_follow_the_closed_form(mode, beta, base):
    scores = torch.tensor([0.9, 0.05, 0.4, 0.4, 0.7, 0.2, 0.0, 1.3], dtype=torch.float64)
    ranks = np.array([2, 7, 4, 5, 3, 6, 8, 1], dtype=np.float64)  # ties: the lower index ranks first
    with np.errstate(divide="ignore"):
        logits = base(scores.numpy(), ranks)
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    trials = 4000
    counts = first_pick_counts(scores, mode, beta, trials)
    seen = expected > 0
    assert counts[~seen].sum() == 0  # a zero score under power is never drawn first
    want = expected[seen] * trials
    chi2 = float(((counts[seen] - want) ** 2 / want).sum())
    pvalue = float(torch.special.gammaincc(torch.tensor((seen.sum() - 1) / 2), torch.tensor(chi2 / 2)))
    assert pvalue > 1e-3, (counts, expected * trials)


def test_stochastic_keys_of_a_shard_merge_to_the_whole_pools_draw():
    g = torch.Generator().manual_seed(0)
    scores, index = torch.rand(300, generator=g, dtype=torch.float64), torch.arange(300)
    whole = top_k(stochastic_keys(scores, index, "power", 1.0, 9, 2), index, 10)[1]
    parts = [top_k(stochastic_keys(scores[a:b], index[a:b], "power", 1.0, 9, 2), index[a:b], 10) for a, b in
             [(0, 100), (100, 256), (256, 300)]]  # fmt: skip
    merged = top_k(torch.cat([k for k, _ in parts]), torch.cat([i for _, i in parts]), 10)[1]
    assert torch.equal(merged, whole)
    with pytest.raises(ValueError, match="scores >= 0"):
        stochastic_keys(-scores, index, "power", 1.0, 9, 2)


# ---------------------------------------------------------------------------------------------
# On the shards: a small CNN trained on real FashionMNIST (conftest `trained`), 560 pool samples.

SHARDED_CASES = [
    ("bald", {}),
    ("batchbald", {"batchbald_samples": 300}),  # 10 classes: exact for 2 picks, then sampled
    ("bald", {"stochastic": "power", "beta": 2.0}),
    ("entropy", {"stochastic": "softmax"}),
    ("margin", {"stochastic": "softrank"}),
    ("least_confidence", {"stochastic": "power"}),
]


def local_pool(trained, shards: int):
    from fm_ray.pool.local import LocalPool
    from fm_ray.pool.shard import set_round

    pool = LocalPool(trained["spec"], trained["x_pool"], shards)
    pool.map(set_round, trained["weights"], trained["labeled"])
    return pool


def pick(pool, trained, strategy: str, seed: int = 0, **kw) -> list[int]:
    import dataclasses

    from fm_ray.pool.shard import set_round
    from fm_ray.strategies import STRATEGIES

    pool.map(set_round, trained["weights"], trained["labeled"])
    ctx = dataclasses.replace(trained["context"](strategy, k=6, **kw), seed=seed)
    return STRATEGIES[strategy].select(pool, ctx).indices


def all_draws(pool, mc) -> torch.Tensor:
    from fm_ray.strategies.mc import mc_blocks

    return torch.cat([lp for blocks in pool.map(lambda s: list(mc_blocks(s, mc))) for _, lp in blocks])


def test_mc_draws_are_the_same_on_1_and_3_shards_and_without_dropout_are_the_predictions(trained):
    from fm_ray.strategies.mc import MCDropout

    one, three = local_pool(trained, 1), local_pool(trained, 3)
    assert three.n_shards == 3
    mc = MCDropout(samples=4, p=0.5, seed=11)
    draws_1 = all_draws(one, mc)
    assert draws_1.shape == (560, 4, 10) and torch.equal(draws_1, all_draws(three, mc))
    assert not torch.equal(draws_1[:, 0], draws_1[:, 1])  # each draw its own mask
    plain = all_draws(one, MCDropout(samples=2, p=0.0, seed=11))
    probs = one.shards[0].predictions()[0]
    assert torch.allclose(plain.exp(), probs[:, None, :].expand(-1, 2, -1), atol=1e-5)


@pytest.mark.parametrize(("strategy", "kw"), SHARDED_CASES)
def test_picks_are_the_same_on_1_and_3_shards(trained, strategy, kw):
    one = pick(local_pool(trained, 1), trained, strategy, **kw)
    assert len(set(one)) == 6 and not set(one) & set(trained["labeled"].tolist())
    assert pick(local_pool(trained, 3), trained, strategy, **kw) == one


def test_a_stochastic_batch_is_not_the_top_k_and_changes_with_the_seed(trained):
    pool = local_pool(trained, 1)
    top = pick(pool, trained, "bald")
    drawn = pick(pool, trained, "bald", stochastic="softmax", beta=1.0)
    assert drawn != top and drawn == pick(pool, trained, "bald", stochastic="softmax", beta=1.0)
    assert pick(pool, trained, "bald", seed=1, stochastic="softmax", beta=1.0) != drawn


def test_option_errors_name_the_fix():
    from fm_ray.config import StrategyConfig
    from fm_ray.errors import UserError
    from fm_ray.strategies import check_strategy

    with pytest.raises(UserError, match="use --stochastic softmax or softrank with margin"):
        check_strategy(StrategyConfig(name="margin", stochastic="power"))
    with pytest.raises(UserError, match="not of fishermask: drop --stochastic"):
        check_strategy(StrategyConfig(name="fishermask", stochastic="softmax"))
    for bad, match in [
        ({"mc_samples": 0}, "--mc-samples"),
        ({"mc_dropout": 1.0}, "--mc-dropout"),
        ({"batchbald_samples": 0}, "--batchbald-samples"),
        ({"beta": 0.0}, "--beta"),
        ({"stochastic": "gibbs"}, "--stochastic"),
    ]:
        with pytest.raises(UserError, match=match):
            check_strategy(StrategyConfig(name="bald", **bad))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_shards_pick_like_one_local_shard(trained):
    import ray

    from fm_ray.config import PoolConfig
    from fm_ray.pool.ray_pool import RayPool

    cases = [("bald", {}), ("batchbald", {"batchbald_samples": 300}), ("entropy", {"stochastic": "softrank"})]
    local = local_pool(trained, 1)
    want = [pick(local, trained, s, **kw) for s, kw in cases]
    ray.init(num_cpus=3, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        pool = RayPool(PoolConfig(backend="ray", shards=3), trained["spec"], trained["x_pool"])
        try:
            assert pool.n_shards == 3
            assert [pick(pool, trained, s, **kw) for s, kw in cases] == want
        finally:
            pool.close()
    finally:
        ray.shutdown()


def test_fm_ray_select_runs_them_on_a_users_model_and_plans_their_memory(monkeypatch):
    import fm_ray
    from fm_ray.errors import UserError
    from fm_ray.strategies import memory

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    pool = torch.rand(600, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    labeled = {i: i % 3 for i in range(0, 600, 50)}
    for strategy, opts in [
        ("batchbald", {"mc_samples": 8, "batchbald_samples": 50}),
        ("bald", {"stochastic": "power"}),
    ]:
        one = fm_ray.select(model, pool, 5, labeled=labeled, strategy=strategy, device="cpu", **opts)
        three = fm_ray.select(model, pool, 5, labeled=labeled, strategy=strategy, device="cpu", shards=3, **opts)
        assert one.ids == three.ids and len(set(one.ids)) == 5 and not set(one.ids) & set(labeled)
    monkeypatch.setattr(memory, "free_ram_bytes", lambda: 10_000_000)  # 3^19 labelings: 10^6 sampled
    with pytest.raises(UserError, match="largest item is .*: lower --batchbald-samples"):
        fm_ray.select(model, pool, 20, labeled=labeled, strategy="batchbald", device="cpu", batchbald_samples=10**6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_draws_and_state_stay_on_the_shards_gpu(trained):
    import dataclasses

    from fm_ray.pool.local import LocalPool
    from fm_ray.pool.shard import set_round

    spec = dataclasses.replace(trained["spec"], device="cuda")
    for strategy, kw in SHARDED_CASES[:3]:
        pool = LocalPool(spec, trained["x_pool"], 3)
        pool.map(set_round, trained["weights"], trained["labeled"])
        picks = pick(pool, trained, strategy, **kw)
        assert len(set(picks)) == 6 and not set(picks) & set(trained["labeled"].tolist())
    pool = LocalPool(spec, trained["x_pool"], 2)
    pick(pool, trained, "batchbald", batchbald_samples=300)
    for shard in pool.shards:
        tensors = {k: v for k, v in vars(shard.state).items() if torch.is_tensor(v)}
        assert {v.device.type for v in tensors.values()} == {"cuda"}, tensors.keys()


def test_sweeps_take_the_new_strategies_and_refuse_stochastic_batchbald():
    from fm_ray.cli import build_parser
    from fm_ray.errors import UserError
    from fm_ray.sweep.grid import sweep_from_args

    def grid(*flags: str):
        return sweep_from_args(build_parser().parse_args(["sweep", "--out", "s", *flags]))[0]

    cfgs = grid("--strategies", "bald,batchbald,entropy", "--mc-samples", "10", "--seeds", "0,1")
    assert sorted({(c.strategy.name, c.strategy.mc_samples) for c in cfgs}) == [
        ("bald", 10), ("batchbald", 10), ("entropy", 10)]  # fmt: skip
    assert {c.strategy.stochastic for c in grid("--strategies", "bald,margin", "--stochastic", "softrank")} == {
        "softrank"
    }
    with pytest.raises(UserError, match="not of batchbald"):
        grid("--strategies", "bald,batchbald", "--stochastic", "power")
