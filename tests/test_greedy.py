"""Greedy Fisher selection: fast == reference == brute force, and shard-partition invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fm_ray.core import greedy
from fm_ray.core.greedy import GreedyState, greedy_select, local_call


@pytest.fixture(autouse=True)
def float64_default():
    """Exactness is claimed in float64; restore the default so other test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_problem(seed: int, S: int, C: int, d: int, n_L: int) -> dict:
    """Candidates with uneven scales; F = mean V^T V over candidates and labeled; S_L = labeled sum."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(S + n_L, C, d, generator=g) * (0.2 + 2 * torch.rand(S + n_L, 1, 1, generator=g))
    flat = V.reshape(-1, d)
    lab = V[S:].reshape(-1, d)
    return {"V": V[:S], "F": flat.T @ flat / (S + n_L), "S_L": lab.T @ lab, "n_L": n_L}


def brute_scores(Vs: np.ndarray, M: np.ndarray, F: np.ndarray, sign: float = 1.0) -> np.ndarray:
    """eq. 12 with explicit inverses: tr(V M^-1 F M^-1 V^T (sign I + V M^-1 V^T)^-1)."""
    B = np.linalg.inv(M)
    eye = np.eye(Vs.shape[1])
    out = [np.trace(v @ B @ F @ B @ v.T @ np.linalg.inv(sign * eye + v @ B @ v.T)) for v in Vs]
    return np.array(out)


def brute_setup(p: dict, K: int, labeled: bool, lam: float) -> tuple[np.ndarray, np.ndarray]:
    d = p["F"].shape[0]
    M = lam * np.eye(d) + (p["S_L"].numpy() / (p["n_L"] + K) if labeled else 0.0)
    return p["V"].numpy() * math.sqrt(K / (p["n_L"] + K)), M


def brute_greedy(p: dict, K: int, labeled: bool, lam: float, b: int) -> list[int]:
    """BAIT's algorithm with M re-inverted from scratch every step (no Woodbury)."""
    Vs, M = brute_setup(p, K, labeled, lam)
    F = p["F"].numpy()
    chosen: list[int] = []
    for _ in range((1 + b) * K):
        s = brute_scores(Vs, M, F)
        s[chosen] = -np.inf
        pick = int(np.argmax(s))  # first maximum = lowest index
        chosen.append(pick)
        M = M + Vs[pick].T @ Vs[pick]
    while len(chosen) > K:
        s = brute_scores(Vs[chosen], M, F, sign=-1.0)
        drop = min(range(len(chosen)), key=lambda i: (-s[i], chosen[i]))
        M = M - Vs[chosen[drop]].T @ Vs[chosen[drop]]
        del chosen[drop]
    return chosen


def run(p: dict, K: int, method: str, labeled: bool, b: int, parts: list[np.ndarray] | None = None):
    S = p["V"].shape[0]
    parts = parts if parts is not None else [np.arange(S)]
    states = [GreedyState(p["V"][torch.from_numpy(q)], torch.from_numpy(q), method=method) for q in parts]
    return greedy_select(
        local_call(states),
        p["F"],
        K,
        n_labeled=p["n_L"],
        labeled_sum_D_D=p["S_L"] if labeled else None,
        lam=1.0,
        backward_steps=b,
    )


CASES = [  # seed, S, C, d, K
    (0, 60, 3, 8, 5),
    (1, 120, 5, 24, 10),
    (2, 200, 10, 64, 15),
    (3, 90, 4, 16, 12),
]


@pytest.mark.parametrize("method", ["fast", "reference"])
@pytest.mark.parametrize("labeled", [False, True])
def test_first_step_scores_match_explicit_inverse(method: str, labeled: bool) -> None:
    p = make_problem(7, 80, 6, 20, n_L=30)
    K = 10
    state = GreedyState(p["V"], torch.arange(80), method=method)
    Vs, M = brute_setup(p, K, labeled, 1.0)
    B0 = torch.from_numpy(np.linalg.inv(M))
    state.init(B0, p["F"], math.sqrt(K / (p["n_L"] + K)))
    want = brute_scores(Vs, M, p["F"].numpy())
    np.testing.assert_allclose(state.scores().numpy(), want, rtol=1e-10)
    want_back = brute_scores(Vs, M, p["F"].numpy(), sign=-1.0)
    np.testing.assert_allclose(state.scores(backward=True).numpy(), want_back, rtol=1e-8)


@pytest.mark.parametrize(("seed", "S", "C", "d", "K"), CASES)
@pytest.mark.parametrize("labeled", [False, True])
@pytest.mark.parametrize("b", [0, 1])
def test_fast_reference_bruteforce_agree(seed, S, C, d, K, labeled, b) -> None:
    p = make_problem(seed, S, C, d, n_L=25)
    fast = run(p, K, "fast", labeled, b)
    assert len(fast) == K and len(set(fast)) == K
    assert fast == run(p, K, "reference", labeled, b)
    if S * C * d <= 120 * 5 * 24:  # the brute force re-inverts M per candidate: keep it small
        assert fast == brute_greedy(p, K, labeled, 1.0, b)


@pytest.mark.parametrize("method", ["fast", "reference"])
@pytest.mark.parametrize("b", [0, 1])
def test_partition_invariance(method: str, b: int) -> None:
    p = make_problem(11, 150, 5, 32, n_L=20)
    # duplicated candidates: exact ties that must go to the lowest global index
    p["V"][100:110] = p["V"][0:10]
    p["V"][140:] = 0.0  # zero embeddings: A = I, score 0
    want = run(p, 12, method, True, b)
    perm = np.random.default_rng(0).permutation(150)
    for n_shards in (2, 3):
        parts = np.array_split(perm, n_shards)
        assert run(p, 12, method, True, b, parts) == want
        assert run(p, 12, method, True, b, parts[::-1]) == want
    parts = [perm[:70], perm[70:70], perm[70:]]  # an empty shard answers index -1
    assert run(p, 12, method, True, b, parts) == want


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_fast_steps_in_blocks_pick_and_keep_what_one_block_does(rows: int, monkeypatch) -> None:
    """A fast step updates and ranks ``STEP_ROWS`` candidates at a time (its temporaries are one
    block's): the same picks, backward steps and ties across blocks included, on 1 and 3 shards, the
    same C x C state after the selection and the same first score range as one block of all."""
    p = make_problem(11, 150, 5, 32, n_L=20)
    p["V"][100:110] = p["V"][0:10]  # exact ties, in other blocks than their twins
    p["V"][140:] = 0.0

    def select(b: int) -> tuple[list[int], GreedyState]:
        state = GreedyState(p["V"], torch.arange(150), method="fast")
        picks = greedy_select(local_call([state]), p["F"], 12, n_labeled=20, labeled_sum_D_D=p["S_L"], backward_steps=b)
        return picks, state

    want = {b: select(b) for b in (0, 1)}
    parts = np.array_split(np.random.default_rng(0).permutation(150), 3)
    monkeypatch.setattr(greedy, "STEP_ROWS", rows)
    for b, (picks, one) in want.items():
        got, state = select(b)
        assert got == picks and run(p, 12, "fast", True, b, parts) == picks
        torch.testing.assert_close(state.A_N_C_C, one.A_N_C_C, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state.N_N_C_C, one.N_N_C_C, rtol=1e-12, atol=1e-12)
        assert state.first_range == pytest.approx(one.first_range, rel=1e-12)
    assert want[0][0] == brute_greedy(p, 12, True, 1.0, 0)


def test_pool_smaller_than_batch() -> None:
    p = make_problem(5, 6, 3, 8, n_L=4)
    picks = run(p, 10, "fast", True, 1)
    assert sorted(picks) == list(range(6))
    assert picks == run(p, 10, "reference", True, 1)


def test_float32_fast_close_to_float64() -> None:
    p = make_problem(3, 100, 4, 16, n_L=10)
    want = run(p, 8, "fast", True, 0)
    p32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in p.items()}
    got = run(p32, 8, "fast", True, 0)
    assert len(set(got) & set(want)) >= 6  # float32 may reorder near-ties, not the bulk


def test_chunked_literal_state_and_empty_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_problem(4, 70, 4, 12, n_L=10)
    want = run(p, 9, "fast", True, 1)
    monkeypatch.setattr(greedy, "_CHUNK_ROWS", 7)  # literal_state in chunks of one candidate
    assert run(p, 9, "fast", True, 1) == want
    assert run(p, 9, "reference", True, 1) == want
    assert run(p, 0, "fast", True, 0) == []


def test_fast_state_holds_no_d_by_d_matrix_or_second_copy() -> None:
    p = make_problem(6, 50, 3, 40, n_L=5)
    state = GreedyState(p["V"], torch.arange(50), method="fast")
    greedy_select(local_call([state]), p["F"], 5, n_labeled=5, labeled_sum_D_D=p["S_L"])
    big = [k for k, v in vars(state).items() if torch.is_tensor(v) and v.numel() >= 40 * 40]
    assert big == ["emb_N_C_D"]


@pytest.mark.parametrize("method", ["fast", "reference"])
def test_bfloat16_storage_computes_in_float32_on_the_rounded_values(method: str, monkeypatch) -> None:
    """Stored bfloat16 embeddings are widened before any arithmetic: the picks are those of float32
    embeddings holding the same (rounded) values, the scores equal to float32 rounding (the widened
    copy may take another GEMM kernel), also when widened chunk by chunk."""
    p = make_problem(8, 90, 4, 16, n_L=10)
    p32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in p.items()}
    p32["V"] = p["V"].bfloat16().float()
    want = run(p32, 9, method, True, 1)
    p16 = dict(p32, V=p["V"].bfloat16())
    assert run(p16, 9, method, True, 1) == want
    state = GreedyState(p16["V"], torch.arange(90), method=method)
    greedy_select(local_call([state]), p16["F"], 5, n_labeled=10, labeled_sum_D_D=p16["S_L"])
    assert state.emb_N_C_D.dtype == torch.bfloat16 and state.compute_dtype == torch.float32
    ref = GreedyState(p32["V"], torch.arange(90), method=method)
    greedy_select(local_call([ref]), p32["F"], 5, n_labeled=10, labeled_sum_D_D=p32["S_L"])
    torch.testing.assert_close(state.scores(), ref.scores(), rtol=1e-5, atol=0)
    monkeypatch.setattr(greedy, "_CHUNK_ROWS", 12)  # widen three candidates at a time
    assert run(p16, 9, method, True, 1) == want
