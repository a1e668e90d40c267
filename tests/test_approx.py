"""The opt-in approximations and the exact savings: literal formulas against brute force on tiny
seeded data (float64), and picks that do not depend on the number of shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm_ray.core import fisher
from fm_ray.core.approx import candidate_keys, fisher_pool_keys, projection, top_class_rows
from fm_ray.core.greedy import initial_inverse
from fm_ray.core.random import hash_uniform
from fm_ray.core.scores import entropy
from fm_ray.pool.local import LocalPool
from fm_ray.pool.shard import set_round
from fm_ray.strategies import STRATEGIES
from fm_ray.strategies.fisher import Approx, build_greedy_state


@pytest.mark.parametrize("n_L, C, d", [(3, 4, 40), (1, 10, 11), (0, 3, 5)])
def test_woodbury_initial_inverse_equals_the_plain_inverse(n_L, C, d):
    g = torch.Generator().manual_seed(n_L + C + d)
    X = torch.randn(n_L * C, d, generator=g, dtype=torch.float64) * 3
    lam, m = 0.7, n_L + 5
    plain = torch.linalg.inv(lam * torch.eye(d, dtype=torch.float64) + X.T @ X / m)
    like = torch.zeros(1, dtype=torch.float64)
    wood = initial_inverse(d, lam, m, labeled_emb_R_D=X, like=like)
    assert (wood - plain).abs().max() < 1e-10
    chol = initial_inverse(d, lam, m, labeled_sum_D_D=(X.T @ X).clone(), like=like)
    assert (chol - plain).abs().max() < 1e-10


def test_top_class_rows_are_the_most_likely_classes_rows():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 5, 7, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(6, 5, generator=g), 1)
    probs[0] = torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1])  # ties go to the lower class
    got = top_class_rows(emb, probs, 2)
    for n in range(6):
        order = sorted(range(5), key=lambda c: (-float(probs[n, c]), c))[:2]
        assert torch.equal(got[n], emb[n, order])
    assert torch.equal(top_class_rows(emb, probs, 5), emb)


def test_projection_is_seeded_and_scaled():
    R = projection(300, 50, seed=3, dtype=torch.float64)
    assert torch.equal(R, projection(300, 50, seed=3, dtype=torch.float64))
    assert not torch.equal(R, projection(300, 50, seed=4, dtype=torch.float64))
    assert abs(float((R.T @ R).diagonal().mean()) * 50 / 300 - 1) < 0.05  # E[R^T R] = (d / r) I


def test_candidate_keys_uniform_and_uncertain():
    index = torch.arange(20, dtype=torch.int64)
    assert torch.equal(candidate_keys("uniform", 5, 2, index, None), hash_uniform(5, 0x5EED + 2, index))
    probs = torch.softmax(torch.randn(20, 3, generator=torch.Generator().manual_seed(1)), 1)
    assert torch.equal(candidate_keys("entropy", 5, 2, index, probs), entropy(probs).double())


def test_shard_state_applies_top_classes_and_projection_like_brute_force(trained):
    """build_greedy_state's stored embeddings and V^T V sums equal the formulas applied by hand."""
    from fm_ray.core.mask import fisher_mask

    pool = LocalPool(trained["spec"], trained["x_pool"], 1)
    pool.map(set_round, trained["weights"], trained["labeled"])
    shard = pool.shards[0]
    mask = fisher_mask(torch.arange(sum(p.numel() for p in shard.model.parameters()), dtype=torch.float64), 120)
    approx = Approx(candidates=torch.arange(0, 560, 7), top_classes=3, project=(16, 11))
    pool_sum, lab_sum, n = build_greedy_state(shard, mask, "fast", 64, "float64", "float32", False, approx)
    x = shard.normalized(shard.images.read(np.arange(560)), torch.float64)
    full = fisher.fisher_embeddings(shard.model_in(torch.float64), x, mask, chunk_size=64)
    with torch.no_grad():
        probs = torch.softmax(shard.model_in(torch.float64)(x), 1)
    rows = []
    for i in range(560):
        order = sorted(range(10), key=lambda c: (-float(probs[i, c]), c))[:3]
        rows.append(full[i, order])
    V = torch.stack(rows) @ projection(120, 16, 11, torch.float64)
    flat = V.reshape(-1, 16)
    assert torch.allclose(pool_sum, flat.T @ flat, rtol=1e-6, atol=1e-9)
    lab = V[torch.from_numpy(trained["labeled"])].reshape(-1, 16)
    assert torch.allclose(lab_sum, lab.T @ lab, rtol=1e-6, atol=1e-9)
    kept = [i for i in range(0, 560, 7) if i not in set(trained["labeled"].tolist())]
    assert shard.state.index_N.tolist() == kept
    assert torch.allclose(shard.state.emb_N_C_D, V[kept], rtol=1e-6, atol=1e-9)
    assert n == 560


def pick(trained, shards: int, strategy: str, **kw) -> list[int]:
    pool = LocalPool(trained["spec"], trained["x_pool"], shards)
    pool.map(set_round, trained["weights"], trained["labeled"])
    return STRATEGIES[strategy].select(pool, trained["context"](strategy, **kw)).indices


APPROX = [
    {"candidates": 100},
    {"candidates": 60, "candidate_rule": "entropy"},
    {"top_classes": 3},
    {"project": 64},
    {"candidates": 100, "top_classes": 2, "project": 32, "backward_steps": 1},
    {"fisher_pool": 150},
    {"fisher_pool": 120, "candidates": 90},
]


@pytest.mark.parametrize("kw", APPROX)
def test_approximate_picks_do_not_depend_on_shards(trained, kw):
    one = pick(trained, 1, "fishermask", sparsity=0.01, **kw)
    assert len(set(one)) == 8 and not set(one) & set(trained["labeled"].tolist())
    assert pick(trained, 3, "fishermask", sparsity=0.01, **kw) == one


def test_candidates_restrict_the_picks_to_the_chosen_subset(trained):
    free = np.setdiff1d(np.arange(560), trained["labeled"])
    keys = hash_uniform(0, 0x5EED + 1, torch.from_numpy(free))  # context: seed 0, round 1
    subset = set(free[np.argsort(-keys.numpy(), kind="stable")[:30]].tolist())
    picks = pick(trained, 2, "fishermask", sparsity=0.01, candidates=30)
    assert set(picks) <= subset
    top = set(free[np.argsort(-entropy(pool_probs(trained)[free]).numpy(), kind="stable")[:30]].tolist())
    assert set(pick(trained, 2, "bait", candidates=30, candidate_rule="entropy")) <= top


@pytest.mark.parametrize("strategy", ["kcenter", "badge"])
def test_diversity_candidates_are_the_shared_subset_on_any_shard_count(trained, strategy):
    """k-center and BADGE take --candidates through the same subset as FisherMask: picks inside
    it (the uniform subset, or the top by entropy), the same on 1 and 3 shards, and a clear error
    when the subset is smaller than the batch."""
    from fm_ray.errors import UserError

    free = np.setdiff1d(np.arange(560), trained["labeled"])
    keys = hash_uniform(0, 0x5EED + 1, torch.from_numpy(free))  # context: seed 0, round 1
    subset = set(free[np.argsort(-keys.numpy(), kind="stable")[:30]].tolist())
    one = pick(trained, 1, strategy, candidates=30)
    assert len(set(one)) == 8 and set(one) <= subset
    assert pick(trained, 3, strategy, candidates=30) == one
    assert one != pick(trained, 1, strategy)  # the subset changed what was picked
    top = set(free[np.argsort(-entropy(pool_probs(trained)[free]).numpy(), kind="stable")[:20]].tolist())
    assert set(pick(trained, 3, strategy, candidates=20, candidate_rule="entropy")) <= top
    with pytest.raises(UserError, match="--candidates 5 is below the 8 picks"):
        pick(trained, 1, strategy, candidates=5)


def pool_probs(trained) -> torch.Tensor:
    pool = LocalPool(trained["spec"], trained["x_pool"], 1)
    pool.map(set_round, trained["weights"], trained["labeled"])
    return pool.shards[0].predictions()[0]


def test_woodbury_start_picks_what_the_plain_inverse_picks(trained, monkeypatch):
    """With few labeled rows the strategy takes the Woodbury path; forcing the plain one picks the same."""
    from fm_ray.strategies import fisher as sfisher

    woodbury = pick(trained, 2, "fishermask", sparsity=0.05)  # 56 x 10 labeled rows < d = 5% of the CNN
    seen = []
    original = sfisher.initial_inverse

    def plain(D, lam, m, *, labeled_sum_D_D=None, labeled_emb_R_D=None, like):
        seen.append(labeled_emb_R_D is not None)
        if labeled_emb_R_D is not None:
            X = labeled_emb_R_D.to(like)
            labeled_sum_D_D, labeled_emb_R_D = X.T @ X, None
        return original(D, lam, m, labeled_sum_D_D=labeled_sum_D_D, like=like)

    monkeypatch.setattr(sfisher, "initial_inverse", plain)
    assert pick(trained, 2, "fishermask", sparsity=0.05) == woodbury
    assert seen == [True]


def test_fisher_pool_sums_the_sample_and_embeds_only_what_is_used(trained, monkeypatch):
    """--fisher-pool: the pool sum is V^T V over the sample alone (brute force), its count the
    sample's size, and with candidates the shard computes embeddings of nothing else (but the
    labeled set's): past the forward pass, the pixels it reads are the sample's, the candidates'
    and the labeled rows'."""
    from fm_ray.core.mask import fisher_mask

    pool = LocalPool(trained["spec"], trained["x_pool"], 1)
    pool.map(set_round, trained["weights"], trained["labeled"])
    shard = pool.shards[0]
    mask = fisher_mask(torch.arange(sum(p.numel() for p in shard.model.parameters()), dtype=torch.float64), 60)
    sample, candidates = torch.arange(3, 560, 11), torch.arange(5, 560, 13)
    shard.predictions()  # the one pass over every member (the forward pass), before counting
    read: list[np.ndarray] = []
    original = shard.images.read
    monkeypatch.setattr(shard.images, "read", lambda pos: read.append(pos) or original(pos))
    approx = Approx(candidates=candidates, fisher_pool=sample)
    pool_sum, lab_sum, n = build_greedy_state(shard, mask, "fast", 64, "float64", "float32", False, approx)
    labeled = set(trained["labeled"].tolist())
    used = set(sample.tolist()) | set(candidates.tolist()) | labeled
    assert set(np.concatenate(read).tolist()) == used and len(np.concatenate(read)) == len(used)
    x = shard.normalized(original(np.arange(560)), torch.float64)
    V = fisher.fisher_embeddings(shard.model_in(torch.float64), x, mask, chunk_size=64)
    flat = V[sample].reshape(-1, 60)
    assert n == len(sample)
    assert torch.allclose(pool_sum, flat.T @ flat, rtol=1e-6, atol=1e-9)
    lab = V[torch.from_numpy(trained["labeled"])].reshape(-1, 60)
    assert torch.allclose(lab_sum, lab.T @ lab, rtol=1e-6, atol=1e-9)
    assert shard.state.index_N.tolist() == [i for i in candidates.tolist() if i not in labeled]


def test_fisher_pool_sample_is_the_top_keys_apart_from_the_candidates(trained, monkeypatch):
    from fm_ray.strategies import fisher as sfisher

    seen = []
    original = sfisher.build_greedy_state
    monkeypatch.setattr(sfisher, "build_greedy_state", lambda shard, *a: seen.append(a[-1]) or original(shard, *a))
    pick(trained, 2, "fishermask", sparsity=0.01, fisher_pool=40, candidates=30)
    free = np.setdiff1d(np.arange(560), trained["labeled"])
    keys = fisher_pool_keys(0, 1, torch.from_numpy(free))  # context: seed 0, round 1
    want = np.sort(free[np.argsort(-keys.numpy(), kind="stable")[:40]])
    assert all(a.fisher_pool.tolist() == want.tolist() for a in seen) and len(seen) == 2
    assert seen[0].candidates.tolist() != seen[0].fisher_pool.tolist()[:30]
