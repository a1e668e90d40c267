"""k-center greedy, BADGE k-means++ seeding and hash uniforms: brute force and partition invariance.

BADGE's shards keep Kronecker factors (g, h) only; the brute force works on the materialized
embeddings g kron h, so every BADGE comparison also checks the factorized distances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fm_ray.core import badge, kcenter
from fm_ray.core.badge import KMeansPPState, badge_embeddings, badge_factors, badge_select
from fm_ray.core.greedy import local_call
from fm_ray.core.kcenter import KCenterState, kcenter_select, min_sq_dist
from fm_ray.core.random import hash_uniform


def feats(seed: int, N: int, E: int, dup: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, E, generator=g, dtype=torch.float64) * (0.5 + torch.rand(N, 1, generator=g, dtype=torch.float64))
    if dup:
        x[N - dup :] = x[:dup]  # exact duplicates: ties must go to the lowest global index
    return x


def gradients(seed: int, N: int, C: int, E: int, dup: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BADGE factors (g, h) of seeded softmax outputs and features, float64; duplicated rows at the end."""
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(N, C, generator=g, dtype=torch.float64) * 2).softmax(-1)
    h = feats(seed + 1000, N, E)
    if dup:
        probs[N - dup :] = probs[:dup]
        h[N - dup :] = h[:dup]
    return badge_factors(probs, h)


def kron(g: torch.Tensor, h: torch.Tensor) -> np.ndarray:
    return (g[:, :, None] * h[:, None, :]).reshape(len(g), -1).numpy()


def badge_call(g: torch.Tensor, h: torch.Tensor, parts: list[np.ndarray]):
    return local_call(
        [KMeansPPState(g[torch.from_numpy(p)], h[torch.from_numpy(p)], torch.from_numpy(p)) for p in parts]
    )


def sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x - c) ** 2).sum(-1)


def brute_kcenter(x: np.ndarray, lab: np.ndarray, K: int) -> list[int]:
    d = np.full(len(x), np.inf)
    for c in lab:
        d = np.minimum(d, sqdist(x, c))
    chosen: list[int] = []
    for _ in range(K):
        s = d.copy()
        s[chosen] = -np.inf
        i = int(np.argmax(s))
        chosen.append(i)
        d = np.minimum(d, sqdist(x, x[i]))
    return chosen


def brute_badge(x: np.ndarray, K: int, seed: int) -> list[int]:
    """k-means++ with the same hash uniforms: first = max norm, then argmin -log(U) / D^2."""
    chosen = [int(np.argmax((x * x).sum(-1)))]
    d2 = sqdist(x, x[chosen[0]])
    while len(chosen) < K:
        u = hash_uniform(seed, len(chosen), torch.arange(len(x))).numpy()
        with np.errstate(divide="ignore"):
            key = -np.log(u) / d2
        key[chosen] = np.inf
        i = int(np.argmin(key))
        chosen.append(i)
        d2 = np.minimum(d2, sqdist(x, x[i]))
    return chosen


def sharded(states_cls, x: torch.Tensor, parts: list[np.ndarray]):
    return local_call([states_cls(x[torch.from_numpy(p)], torch.from_numpy(p)) for p in parts])


def partitions(N: int) -> list[list[np.ndarray]]:
    perm = np.random.default_rng(1).permutation(N)
    out = [[np.arange(N)]]
    for k in (2, 3):
        out += [np.array_split(perm, k), np.array_split(perm, k)[::-1]]
    out.append([perm[:10], perm[10:10], perm[10:]])  # with an empty shard
    return out


@pytest.mark.parametrize("n_labeled", [0, 1, 15])
def test_kcenter_matches_bruteforce_any_partition(n_labeled: int) -> None:
    x = feats(0, 120, 7, dup=20)
    lab = feats(1, n_labeled, 7)
    want = brute_kcenter(x.numpy(), lab.numpy(), 25)
    if n_labeled == 0:
        assert want[0] == 0  # documented rule: no labeled points -> lowest global index first
    for parts in partitions(120):
        assert kcenter_select(sharded(KCenterState, x, parts), 25, lab) == want


def test_kcenter_pool_smaller_than_batch() -> None:
    x = feats(2, 5, 3)
    assert sorted(kcenter_select(sharded(KCenterState, x, [np.arange(5)]), 9, x[:0])) == list(range(5))


def test_min_sq_dist_does_not_depend_on_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x, c = feats(3, 97, 11), feats(4, 13, 11)
    whole = min_sq_dist(x, c)
    monkeypatch.setattr(kcenter, "_CHUNK_ELEMS", 50)
    assert torch.equal(min_sq_dist(x, c), whole)
    assert torch.equal(torch.cat([min_sq_dist(x[i : i + 1], c) for i in range(97)]), whole)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_badge_matches_bruteforce_any_partition(seed: int) -> None:
    g, h = gradients(10 + seed, 110, 4, 6, dup=15)
    want = brute_badge(kron(g, h), 20, seed)
    assert len(set(want)) == 20
    for parts in partitions(110):
        assert badge_select(badge_call(g, h, parts), 20, seed) == want


@pytest.mark.parametrize("seed", [0, 1])
def test_badge_factorized_distances_equal_materialized(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """After every pick, each shard's D^2 equals min_c |x - c|^2 on the materialized embeddings."""
    g, h = gradients(20 + seed, 90, 5, 7, dup=10)
    x = kron(g, h)
    want = brute_badge(x, 12, seed)
    monkeypatch.setattr(badge, "_CHUNK_ELEMS", 13)  # row dot products in blocks of one or two rows
    for parts in partitions(90)[:3]:
        states = [KMeansPPState(g[torch.from_numpy(p)], h[torch.from_numpy(p)], torch.from_numpy(p)) for p in parts]
        assert badge_select(local_call(states), 12, seed) == want
        d2 = np.full(90, np.nan)
        for p, s in zip(parts, states, strict=True):
            d2[p] = s.d2_N.numpy()
        brute = np.min([sqdist(x, x[c]) for c in want[:-1]], axis=0)  # the last pick was never added
        np.testing.assert_allclose(d2, brute, rtol=1e-10, atol=1e-12 * float((x * x).sum(-1).max()))
        assert np.all(d2[np.isin(np.arange(90), want[:-1])] == 0)  # a center is exactly at distance 0
        dup = want[0] + 80 if want[0] < 10 else None
        if dup is not None:
            assert d2[dup] == 0  # an exact duplicate of a center too


def test_badge_state_holds_factors_not_the_embedding_matrix() -> None:
    g, h = gradients(3, 50, 10, 64)
    state = KMeansPPState(g, h, torch.arange(50))
    badge_select(local_call([state]), 5, 0)
    sizes = {k: v.numel() for k, v in vars(state).items() if torch.is_tensor(v)}
    assert max(sizes.values()) == 50 * 64  # h; never N x C E = 50 x 640
    assert sorted(sizes) == ["chosen_N", "d2_N", "eligible_N", "g_N_C", "gg_N", "h_N_E", "hh_N", "index_N"]
    assert state.h_N_E is h and state.g_N_C is g  # held as given: no float64 copy of the factors


def test_states_in_blocks_pick_and_measure_what_whole_ones_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 1-3 rows (every step's temporaries) give the same picks and the same bits of
    every distance as one block; float32 factors are promoted per block as they would be whole."""
    x32, lab = feats(5, 40, 6, dup=8).float(), feats(6, 4, 6).float()
    g64, h64 = gradients(7, 40, 5, 6, dup=8)
    g, h = g64.float(), h64.float()

    def run() -> tuple[list[int], torch.Tensor, list[int], torch.Tensor]:
        k = KCenterState(x32, torch.arange(40))
        b = KMeansPPState(g, h, torch.arange(40))
        return kcenter_select(local_call([k]), 8, lab), k.dist_N, badge_select(local_call([b]), 8, 3), b.d2_N

    whole = run()
    monkeypatch.setattr(kcenter, "_CHUNK_ELEMS", 13)  # 2 rows of E = 6 a block
    monkeypatch.setattr(badge, "_BLOCK_ELEMS", 30)  # 2 rows of C + E = 11 a block
    blocked = run()
    assert blocked[0] == whole[0] and blocked[2] == whole[2]
    assert torch.equal(blocked[1], whole[1]) and torch.equal(blocked[3], whole[3])
    assert badge_select(badge_call(g64, h64, [np.arange(40)]), 8, 3) == brute_badge(kron(g64, h64), 8, 3)


def test_only_eligible_rows_are_picked_and_the_others_still_measure() -> None:
    """A shard's state over every member, its candidates eligible: the picks are those of a state
    over the candidates alone (k-center: the same distances to the labeled set)."""
    x, lab = feats(8, 90, 5), feats(9, 6, 5)
    g, h = gradients(10, 90, 4, 5)
    eligible = torch.from_numpy(np.random.default_rng(0).random(90) < 0.6)
    idx = torch.arange(90)
    rows = idx[eligible]
    for parts in partitions(90)[:4]:
        k_states = [KCenterState(x[torch.from_numpy(p)], torch.from_numpy(p), eligible[p]) for p in parts]
        assert (
            kcenter_select(local_call(k_states), 15, lab)
            == rows[brute_kcenter(x[rows].numpy(), lab.numpy(), 15)].tolist()
        )
        b_states = [
            KMeansPPState(g[torch.from_numpy(p)], h[torch.from_numpy(p)], torch.from_numpy(p), eligible[p])
            for p in parts
        ]
        sub = badge_select(local_call([KMeansPPState(g[rows], h[rows], rows)]), 15, 4)
        assert badge_select(local_call(b_states), 15, 4) == sub
        assert set(sub) <= set(rows.tolist())


def test_badge_never_repeats_when_only_duplicates_remain() -> None:
    g, h = (
        torch.ones(6, 1, dtype=torch.float64),
        torch.ones(6, 3, dtype=torch.float64),
    )  # every D^2 is 0 after the first pick
    assert badge_select(badge_call(g, h, [np.arange(6)]), 6, 0) == list(range(6))


def test_badge_race_samples_proportional_to_d2() -> None:
    # first center = the largest norm, point 0; D^2 of the others to it: 1, 2, 3, 4
    x = torch.tensor([[10.0], [9.0], [10.0 - 2**0.5], [10.0 - 3**0.5], [8.0]], dtype=torch.float64)
    n = 4000
    call = badge_call(torch.ones(5, 1, dtype=torch.float64), x, [np.arange(5)])  # C = 1: the embedding is h
    counts = np.bincount([badge_select(call, 2, s)[1] for s in range(n)], minlength=5)
    assert counts[0] == 0
    p = np.array([1, 2, 3, 4]) / 10
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts[1:] - n * p) < 4 * sd), counts


def test_badge_embeddings_are_cross_entropy_gradients() -> None:
    """The materialized reference (g kron h from badge_factors) is the gradient BADGE defines."""
    g = torch.Generator().manual_seed(0)
    N, E, C = 9, 5, 4
    h = torch.randn(N, E, generator=g, dtype=torch.float64)
    W = torch.randn(C, E, generator=g, dtype=torch.float64, requires_grad=True)
    logits = h @ W.T
    probs = logits.softmax(-1)
    emb = badge_embeddings(probs.detach(), h)
    assert emb.shape == (N, C * E)
    for i in range(N):
        (grad,) = torch.autograd.grad(
            torch.nn.functional.cross_entropy(logits[i], probs[i].argmax()), W, retain_graph=True
        )
        torch.testing.assert_close(emb[i], grad.reshape(-1))


def test_hash_uniform_properties() -> None:
    idx = torch.arange(20000)
    u = hash_uniform(3, 5, idx)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    assert torch.equal(u[torch.tensor([7, 3])], hash_uniform(3, 5, torch.tensor([7, 3])))
    assert not torch.equal(u, hash_uniform(3, 6, idx)) and not torch.equal(u, hash_uniform(4, 5, idx))
    assert abs(float(u.mean()) - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert bool((hist - 2000).abs().max() < 200)
    assert bool((hash_uniform(-1, 2**70, idx) > 0).all())  # any Python ints are folded into 64 bits
