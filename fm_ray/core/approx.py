"""Opt-in approximations of the Fisher embeddings for when exact selection does not fit.

Each is shard-invariant: what a sample becomes depends on the sample, the seed and the round only,
never on which shard holds it.

- ``top_class_rows``: keep the rows of each sample's ``c`` most likely classes (Fast Fishing's
  "BAIT Exp", Huseljic et al. 2024, arXiv 2404.08981): ``V_x`` becomes ``c x d`` and the per-step
  state ``c x c``; ``V_x^T V_x`` drops the other classes' terms ``p_c g~_c g~_c^T``.
- ``projection``: a seeded Gaussian ``R`` (``d x r``, entries ``N(0, 1/r)``, so ``E[R R^T] = I``);
  ``V_x R`` replaces ``V_x``, and every d x d matrix (``F``, ``M^-1``, partial sums) becomes r x r.
- ``candidate_keys``: the key a candidate subset is chosen by (``--candidates N``): a seeded hash
  uniform of the pool position (a uniform random subset) or an uncertainty score; the subset is
  the N highest keys, ties to the lower pool position (see ``core.scores.top_k``).
- ``fisher_pool_keys``: the key the sample the pool Fisher ``F`` is estimated from is chosen by
  (``--fisher-pool N``): a seeded hash uniform of the pool position, drawn apart from the
  candidates'. ``F`` is a mean over the pool, so the sample's mean is an unbiased estimate of it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fm_ray.core.random import hash_uniform
from fm_ray.core.scores import SCORES

_CANDIDATE_STEP = 0x5EED  # the hash_uniform step reserved for candidate subsets
_FISHER_POOL_STEP = 0xF15E << 32  # and for the --fisher-pool sample (apart from any round's candidates)


def top_class_rows(emb_N_C_D: Tensor, probs_N_C: Tensor, c: int) -> Tensor:
    """Rows of the ``c`` most likely classes of each sample, most likely first (ties: lower class).

    Args:
        emb_N_C_D: Fisher embeddings.
        probs_N_C: the same samples' softmax probabilities.
        c: classes kept (``c >= C`` keeps all, in the original order).

    Returns:
        ``(N, min(c, C), D)``.
    """
    N, C, D = emb_N_C_D.shape
    if c >= C:
        return emb_N_C_D
    order_N_C = torch.sort(probs_N_C.to(emb_N_C_D.device), dim=1, descending=True, stable=True).indices
    keep_N_c = order_N_C[:, :c]
    return torch.gather(emb_N_C_D, 1, keep_N_c[:, :, None].expand(N, c, D))


def projection_seed(seed: int, round: int) -> int:
    """One integer seed per (run seed, round): the same on every shard."""
    return int(np.random.SeedSequence([seed, 7, round]).generate_state(1, dtype=np.uint64)[0] >> 1)


def projection(D: int, r: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``d x r`` Gaussian projection, entries ``N(0, 1 / r)``, drawn on the CPU from ``seed``.

    Drawn in float64 and rounded, so it is the same bits on every machine and shard."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D, r, generator=g, dtype=torch.float64) / r**0.5).to(dtype)


def candidate_keys(rule: str, seed: int, round: int, index_N: Tensor, probs_N_C: Tensor | None) -> Tensor:
    """Keys to choose ``--candidates`` by, higher first: ``uniform`` hashes the pool position with
    the seed and round (so the subset is uniform and shard-invariant); otherwise an uncertainty score of
    ``probs_N_C`` (``entropy``, ``margin``, ``least_confidence``)."""
    if rule == "uniform":
        return hash_uniform(seed, _CANDIDATE_STEP + round, index_N)
    assert probs_N_C is not None, f"candidate rule {rule!r} needs the probabilities"
    return SCORES[rule](probs_N_C).double()


def fisher_pool_keys(seed: int, round: int, index_N: Tensor) -> Tensor:
    """Keys the ``--fisher-pool`` sample is chosen by (its N highest): uniform, seeded, shard-invariant."""
    return hash_uniform(seed, _FISHER_POOL_STEP + round, index_N)
