"""Bayesian acquisition from MC-dropout draws: BALD and BatchBALD, over ``log_probs_N_T_C``.

- BALD (Houlsby et al. 2011, arXiv 1112.5745; Gal et al. 2017, arXiv 1703.02910): the mutual
  information ``I[y; theta] = H[mean_t p_t] - mean_t H[p_t]`` per sample.
- BatchBALD (Kirsch et al. 2019, arXiv 1906.08158): greedily add the candidate ``n`` maximizing the
  joint mutual information ``H[y_1..y_b, y_n] - sum_i mean_t H[p_t(y_i)] - mean_t H[p_t(y_n)]``.

The joint entropy ``H[y_1..y_b, y_n]`` is written so every term is a normalized distribution (no
underflow however many picks): for each row ``m`` of the picks' labelings, ``w_m = mean_t
prod_i p_t(y_mi)`` and ``pi_m(t) = prod_i p_t(y_mi) / (T w_m)`` (the draws' posterior given that
labeling); then ``r_m = pi_m @ p_n`` is a distribution over ``y_n`` and

- exactly, over all ``C^b`` labelings: ``H = -sum_m w_m log w_m + sum_m w_m H[r_m]``;
- estimated from ``M`` labelings drawn from ``p(y_1..y_b)``: ``H ~ (1/M) sum_m (-log w_m + H[r_m])``
  (batchbald_redux's importance-sampled estimate, ``q / w`` regrouped).

The driver keeps the labelings (``JointBuilder``) and sends ``(pi_M_T, weight_M, offset)`` each step
(``JointDraws``); each shard scores its candidates (``BatchBALDState``) and answers its best, ties
to the lower global index, as FisherMask's greedy (``core.greedy``). Candidates are scored in
chunks of a power of two rows that divides the shards' 256-sample blocks, so a candidate's score is
the same arithmetic whatever the partition, and the picks are the same on any shard count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fm_ray.core.greedy import (
    CHUNK_BYTES,
    Progress,
    ShardBest,
    StateCall,
    best_of,
    local_best,
    local_call,
    no_progress,
    score_range,
)
from fm_ray.core.random import hash_uniform

_ALIGN = 256  # pool.shard.BLOCK: shards start on multiples of it, and score chunks divide it


def mc_seed(seed: int, round: int, tag: int) -> int:
    """One integer seed per (run seed, round, use): the same on every shard (``tag`` keeps the uses'
    streams apart: dropout masks, BatchBALD's sampled labelings)."""
    return int(np.random.SeedSequence([seed, tag, round]).generate_state(1, dtype=np.uint64)[0] >> 1)


def dropout_masks(seed: int, T: int, E: int, p: float) -> Tensor:
    """``T`` inverted-dropout masks over ``E`` features, float32 on the CPU: feature ``e`` of draw
    ``t`` is kept (``1 / (1 - p)``) when ``hash_uniform(seed, t, e) >= p``, else 0.

    One mask per draw shared by every sample (batchbald_redux's consistent MC dropout): draw ``t``
    is one sampled network, which the joint of BatchBALD needs, and no mask depends on the shard.
    """
    keep_T_E = torch.stack([hash_uniform(seed, t, torch.arange(E)) >= p for t in range(T)])
    return keep_T_E.to(torch.float32) / (1.0 - p)


def mc_log_probs(feats_N_E: Tensor, weight_C_E: Tensor, bias_C: Tensor | None, masks_T_E: Tensor) -> Tensor:
    """``log_softmax(head(feats * mask_t))`` for every draw: ``log_probs_N_T_C`` in ``feats``' dtype."""
    x_N_T_E = feats_N_E[:, None, :] * masks_T_E[None].to(feats_N_E)
    logits_N_T_C = x_N_T_E @ weight_C_E.to(feats_N_E).T
    if bias_C is not None:
        logits_N_T_C = logits_N_T_C + bias_C.to(feats_N_E)
    return logits_N_T_C.log_softmax(-1)


def bald_scores(log_probs_N_T_C: Tensor) -> Tensor:
    """BALD: ``H[mean_t p_t] - mean_t H[p_t]`` per sample, float64 (``0 log 0 = 0`` by xlogy).

    The mutual information is never negative; rounding can make it ``-1e-17`` where every draw
    agrees, so it is clamped at 0 (``--stochastic power`` takes its logarithm)."""
    p_N_T_C = log_probs_N_T_C.double().exp()
    mean_N_C = p_N_T_C.mean(1)
    entropy_of_mean_N = -torch.special.xlogy(mean_N_C, mean_N_C).sum(-1)
    mean_entropy_N = -torch.special.xlogy(p_N_T_C, p_N_T_C).sum(-1).mean(1)
    return (entropy_of_mean_N - mean_entropy_N).clamp_min(0.0)


def chunk_rows(M: int, C: int) -> int:
    """Candidates scored at once against ``M`` labelings: a power of two (so it divides the 256-sample
    blocks shards are cut on) with the ``(rows, M, C)`` float64 temporaries within ``CHUNK_BYTES``."""
    rows = _ALIGN
    while rows > 1 and 2 * rows * M * C * 8 > CHUNK_BYTES:
        rows //= 2
    return rows


@dataclass(frozen=True)
class JointDraws:
    """The picked samples' joint, as the shards need it (see the module docstring).

    Attributes:
        picked: global index of the latest pick (the shards drop it from their candidates).
        pi_M_T: each labeling's posterior over the ``T`` draws (rows sum to 1), float64.
        weight_M: ``w_m`` (exact) or ``1 / M`` (sampled).
        offset: ``-sum w log w`` (exact) or ``-mean log w`` (sampled), minus the picks' summed
            conditional entropies: the same for every candidate.
    """

    picked: int
    pi_M_T: Tensor
    weight_M: Tensor
    offset: float


class BatchBALDState:
    """One shard's members for BatchBALD: their MC draws, which of them are candidates.

    Args:
        log_probs_N_T_C: every member's MC log-probabilities (labeled ones too: the score chunks
            then start where the shard's blocks do).
        index_N: their global pool indices (int64).
        eligible_N: the candidates (unlabeled members).
    """

    def __init__(self, log_probs_N_T_C: Tensor, index_N: Tensor, eligible_N: Tensor) -> None:
        self.log_probs_N_T_C = log_probs_N_T_C
        device = log_probs_N_T_C.device
        self.index_N = torch.as_tensor(index_N, dtype=torch.int64, device=device)
        self.eligible_N = eligible_N.to(device=device, dtype=torch.bool).clone()
        N, T, C = log_probs_N_T_C.shape
        self.cond_N = torch.zeros(N, dtype=torch.float64, device=device)  # mean_t H[p_t]
        for lo in range(0, N, _ALIGN):
            p = log_probs_N_T_C[lo : lo + _ALIGN].double().exp()
            self.cond_N[lo : lo + _ALIGN] = -torch.special.xlogy(p, p).sum(-1).mean(1)
        self.first_range: tuple[float, float] | None = None  # scores of the first step (BALD's)

    def step(self, joint: JointDraws | None) -> ShardBest:
        """Drop the latest pick, then answer the best candidate against ``joint`` (None: no picks yet);
        the answer carries its ``log_probs_T_C`` (float64) for the driver's joint."""
        if joint is not None:
            self.eligible_N[self.index_N == joint.picked] = False
        score_N = self.scores(joint)
        if self.first_range is None:
            self.first_range = score_range(score_N, self.eligible_N)
        pos = local_best(score_N, self.eligible_N, self.index_N)
        if pos < 0:
            return ShardBest(-math.inf, -1)
        return ShardBest(float(score_N[pos]), int(self.index_N[pos]), self.log_probs_N_T_C[pos].double().cpu())

    def scores(self, joint: JointDraws | None) -> Tensor:
        """Joint mutual information of the picks plus each member, float64 (-inf: not a candidate)."""
        N, T, C = self.log_probs_N_T_C.shape
        device = self.log_probs_N_T_C.device
        if joint is None:
            pi_M_T = torch.full((1, T), 1.0 / T, dtype=torch.float64, device=device)
            weight_M, offset = torch.ones(1, dtype=torch.float64, device=device), 0.0
        else:
            pi_M_T, weight_M, offset = joint.pi_M_T.to(device), joint.weight_M.to(device), joint.offset
        out_N = torch.full((N,), -math.inf, dtype=torch.float64, device=device)
        rows = chunk_rows(len(pi_M_T), C)
        for lo in range(0, N, rows):
            if not bool(self.eligible_N[lo : lo + rows].any()):
                continue
            p_n_T_C = self.log_probs_N_T_C[lo : lo + rows].double().exp()
            r_n_M_C = torch.matmul(pi_M_T, p_n_T_C)  # each labeling's predictive for the candidate
            h_n_M = -torch.special.xlogy(r_n_M_C, r_n_M_C).sum(-1)
            out_N[lo : lo + rows] = (h_n_M * weight_M).sum(-1) + offset - self.cond_N[lo : lo + rows]
        return torch.where(self.eligible_N, out_N, torch.full_like(out_N, -math.inf))


class JointBuilder:
    """The driver's joint of the picks' draws: every labeling while ``C^b <= num_samples``, then
    ``num_samples`` labelings drawn from ``p(y_1..y_b)``: labeling ``m`` draws its labels from draw
    ``t_m = m mod T`` (stratified over the draws), pick ``i``'s label by inverse CDF of
    ``hash_uniform(seed, i, m)``. A labeling's labels depend on the picks' draws and the seed only,
    so the labelings grow one pick at a time and a restart rebuilds the same ones."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples, self.seed = num_samples, seed
        self.picks_T_C: list[Tensor] = []  # the picks' log-probabilities, float64
        self.log_joint_M_T: Tensor | None = None  # log prod_i p_t(y_mi)
        self.sampled = False
        self.cond_sum = 0.0

    def add(self, log_probs_T_C: Tensor) -> None:
        lp_T_C = log_probs_T_C.double().cpu()
        T, C = lp_T_C.shape
        p_T_C = lp_T_C.exp()
        self.cond_sum += float(-torch.special.xlogy(p_T_C, p_T_C).sum(-1).mean())
        self.picks_T_C.append(lp_T_C)
        if self.log_joint_M_T is None:
            self.log_joint_M_T = torch.zeros(1, T, dtype=torch.float64)
        if not self.sampled and len(self.log_joint_M_T) * C > self.num_samples:
            self.sampled = True  # from here on an estimate: draw every pick's labels so far
            self.log_joint_M_T = torch.zeros(self.num_samples, T, dtype=torch.float64)
            for i, lp in enumerate(self.picks_T_C):
                self._add_sampled(i, lp)
        elif self.sampled:
            self._add_sampled(len(self.picks_T_C) - 1, lp_T_C)
        else:  # labeling m then label c is row m * C + c
            self.log_joint_M_T = (self.log_joint_M_T[:, None, :] + lp_T_C.T[None]).reshape(-1, T)

    def _add_sampled(self, i: int, lp_T_C: Tensor) -> None:
        assert self.log_joint_M_T is not None
        M, T = self.log_joint_M_T.shape
        m_M = torch.arange(M)
        t_M = m_M % T
        cdf_M_C = lp_T_C.exp()[t_M].cumsum(-1)
        u_M = hash_uniform(self.seed, i, m_M) * cdf_M_C[:, -1]
        y_M = torch.searchsorted(cdf_M_C, u_M[:, None]).squeeze(1).clamp_max(lp_T_C.shape[1] - 1)
        self.log_joint_M_T += lp_T_C[:, y_M].T

    def message(self, picked: int) -> JointDraws:
        assert self.log_joint_M_T is not None
        M, T = self.log_joint_M_T.shape
        norm_M = torch.logsumexp(self.log_joint_M_T, dim=1)
        log_w_M = norm_M - math.log(T)
        pi_M_T = torch.nan_to_num((self.log_joint_M_T - norm_M[:, None]).exp(), nan=0.0)  # -inf rows: 0
        if self.sampled:
            weight_M = torch.full((M,), 1.0 / M, dtype=torch.float64)
            entropy = float(-log_w_M.mean())
        else:
            weight_M = log_w_M.exp()
            entropy = float(-torch.special.xlogy(weight_M, weight_M).sum())
        return JointDraws(picked, pi_M_T, weight_M, entropy - self.cond_sum)


def batchbald_greedy(
    call: StateCall[BatchBALDState], k: int, *, num_samples: int, seed: int, progress: Progress = no_progress
) -> list[int]:
    """Greedy BatchBALD over shard states: one best per shard per step, the best of those picked.

    Returns:
        ``k`` global indices (fewer if the candidates run out) in the order they were chosen.
    """
    joint = JointBuilder(num_samples, seed)
    picks: list[int] = []
    message: JointDraws | None = None
    for _ in progress(range(k), "BatchBALD", total=k, unit="pick"):
        best = best_of(call(BatchBALDState.step, message))
        if best.index < 0:
            break
        assert best.emb is not None
        picks.append(best.index)
        joint.add(best.emb)
        message = joint.message(best.index)
    return picks


def batchbald_select(log_probs_N_T_C: Tensor, k: int, *, num_samples: int, seed: int) -> list[int]:
    """BatchBALD's ``k`` picks (positions in ``log_probs_N_T_C``, in pick order): exact joint entropy
    while the picks' labelings ``C^b`` number at most ``num_samples``, else estimated from
    ``num_samples`` labelings drawn with ``seed``. The same picks as the shard-wise form."""
    N = log_probs_N_T_C.shape[0]
    state = BatchBALDState(log_probs_N_T_C, torch.arange(N), torch.ones(N, dtype=torch.bool))
    return batchbald_greedy(local_call([state]), k, num_samples=num_samples, seed=seed)
