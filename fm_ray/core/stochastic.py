"""Stochastic batches for any score (Kirsch et al. 2023, "Stochastic Batch Acquisition", arXiv 2106.12059).

Instead of the top-k scores, draw k candidates without replacement with probabilities
``p_n ∝ exp(base_n)``, by Gumbel-top-k: the k highest ``base_n + G_n``, ``G_n = -log(-log U_n)``.

- ``power``: ``base = beta log s`` (``p ∝ s^beta``; the scores must be >= 0),
- ``softmax``: ``base = beta s``,
- ``softrank``: ``base = -beta log rank`` (``p ∝ rank^-beta``, rank 1 = the highest score).

``U_n`` is ``hash_uniform`` of the sample's pool position (and the seed and round), so a shard's
top k keys merged on the driver (``core.scores.top_k``) are the whole pool's draw. Ranks are
global: softrank's keys are computed where every candidate's score is (the driver).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fm_ray.core.random import hash_uniform

_STEP = 0x57CB  # hash_uniform steps reserved for stochastic batches: _STEP << 32 | round


def ranks(scores_N: Tensor, index_N: Tensor) -> Tensor:
    """1 for the highest score, N for the lowest; ties to the lower global index (as ``top_k``)."""
    order = np.lexsort((index_N.cpu().numpy(), -scores_N.double().cpu().numpy()))
    rank_N = np.empty(len(order), dtype=np.float64)
    rank_N[order] = np.arange(1, len(order) + 1)
    return torch.from_numpy(rank_N)


def stochastic_keys(scores_N: Tensor, index_N: Tensor, mode: str, beta: float, seed: int, round: int) -> Tensor:
    """Gumbel-perturbed keys, float64 on the CPU: the k highest are a draw of k without replacement
    with probabilities ``∝ exp(base)`` (module docstring). ``softrank`` ranks ``scores_N`` among
    themselves: pass every candidate of the pool."""
    s_N = scores_N.double().cpu()
    if mode == "power":
        if bool((s_N < 0).any()):
            raise ValueError("power sampling needs scores >= 0 (it takes their logarithm)")
        base_N = beta * torch.log(s_N)  # log 0 = -inf: never drawn before a positive score
    elif mode == "softmax":
        base_N = beta * s_N
    elif mode == "softrank":
        base_N = -beta * torch.log(ranks(s_N, index_N))
    else:
        raise ValueError(f"unknown stochastic mode {mode!r}: power, softmax or softrank")
    u_N = hash_uniform(seed, (_STEP << 32) | round, index_N.cpu())
    return base_N - torch.log(-torch.log(u_N))
