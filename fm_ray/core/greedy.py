"""Shard-wise greedy Fisher selection (FisherMask arXiv 2411.05752 eqs. 10-12; BAIT, NeurIPS 2021).

The driver holds the running inverse ``B = M^-1`` (d x d) and the pool Fisher ``F``; each shard
holds its candidates' Fisher embeddings ``V_x`` (C x d). One round trip per step: the driver
broadcasts the previous pick's small factors, every shard applies them and answers its best
candidate. Two shard implementations give the same picks:

- ``reference``: eq. 12 literally, ``tr(V B F B V^T (I + V B V^T)^-1)`` from the full ``B`` each
  step, O(S C d^2) per step.
- ``fast``: per-candidate ``A_x = I + V_x B V_x^T`` and ``N_x = V_x B F B V_x^T`` (C x C) kept
  exact under the Woodbury update ``B' = B - W G W^T`` (``W = B U^T``, ``G = (+-I + U W)^-1``):
  with ``P_x = V_x W``, ``Q_x = V_x B F W``,
  ``A' = A - P G P^T`` and ``N' = N - P G Q^T - Q G P^T + P G (W^T F W) G P^T``, O(S C^2 d) per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Concatenate, Generic, Literal, ParamSpec, Protocol, TypeVar

import torch
from torch import Tensor


class Progress(Protocol):
    """How a selection loop reports its steps (a tqdm-like wrapper); the core itself prints nothing."""

    def __call__(
        self, items: Iterable[int], desc: str, total: int | None = None, unit: str = "it"
    ) -> Iterable[int]: ...


def no_progress(items: Iterable[int], desc: str, total: int | None = None, unit: str = "it") -> Iterable[int]:
    return items


P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")
S_co = TypeVar("S_co", covariant=True)

_CHUNK_ROWS = 1 << 16  # rows of V (candidates x C) multiplied by a d x d matrix at once, at most
CHUNK_BYTES = 1 << 28  # and at most this many bytes per chunk-sized temporary (V, V B, V B F)
COLUMN_BLOCK = 2048  # columns of a d x d matrix converted to the shard's dtype/device at once
# candidates a fast greedy step updates and ranks at once (its temporaries' rows); a power of two, so
# its GEMMs see whole kernel panels as one block of all does (duplicates keep tying exactly)
STEP_ROWS = 1 << 13
STEP_TEMPORARIES = 8  # C x C float64 arrays per candidate alive at once in a fast step's block, at most


class StateCall(Protocol[S_co]):
    """How a selection driver talks to its shards' states (``GreedyState``, ``KCenterState``,
    ``KMeansPPState``): ``call(fn, *args)`` runs ``fn(state, *args)`` on every shard's state and
    returns the answers in shard order. ``fn`` is a module-level function or an unbound method
    (e.g. ``GreedyState.step``), so a type checker follows the call and Ray pickles it by name."""

    def __call__(self, fn: Callable[Concatenate[S_co, P], R], /, *args: P.args, **kwargs: P.kwargs) -> list[R]: ...


class LocalCall(Generic[S]):
    """In-process ``StateCall`` over ``states`` (the pools provide the same over their shards)."""

    def __init__(self, states: Sequence[S]) -> None:
        self.states = list(states)

    def __call__(self, fn: Callable[Concatenate[S, P], R], /, *args: P.args, **kwargs: P.kwargs) -> list[R]:
        return [fn(s, *args, **kwargs) for s in self.states]


def local_call(states: Sequence[S]) -> StateCall[S]:
    return LocalCall(states)


@dataclass(frozen=True)
class ShardBest:
    """A shard's answer: best score, its global index (-1: none left) and its embedding."""

    score: float
    index: int
    emb: Tensor | None = None


def best_of(answers: Sequence[ShardBest]) -> ShardBest:
    """Highest score over shard answers, ties to the lowest global index; index -1 if none."""
    valid = [a for a in answers if a.index >= 0]
    if not valid:
        return ShardBest(-math.inf, -1)
    return min(valid, key=lambda a: (-a.score, a.index))


def local_best(score_N: Tensor, eligible_N: Tensor, index_N: Tensor) -> int:
    """Local position of the best eligible score, ties to the lowest global index; -1 if none.

    A NaN score ranks as -inf: NaN equals nothing, so without this no candidate would tie the
    maximum and the argmin below would answer position 0, eligible or not (BADGE's duplicates)."""
    if not bool(eligible_N.any()):
        return -1
    score_N = torch.where(eligible_N & ~score_N.isnan(), score_N, torch.full_like(score_N, -math.inf))
    top = score_N[eligible_N].max()
    tied_N = eligible_N & (score_N == top)
    big = torch.iinfo(torch.int64).max
    return int(torch.where(tied_N, index_N, torch.full_like(index_N, big)).argmin())


def score_range(score_N: Tensor, eligible_N: Tensor) -> tuple[float, float]:
    """(min, max) of the eligible scores; NaN if any is NaN; (inf, -inf) if none is eligible.

    What the strategies report of their first scoring step, for the "all equal" guard (see
    ``fm_ray.strategies.all_equal``)."""
    s_N = score_N[eligible_N].double()
    if not len(s_N):
        return math.inf, -math.inf
    if bool(s_N.isnan().any()):
        return math.nan, math.nan
    return float(s_N.min()), float(s_N.max())


Block = Callable[[slice], tuple[Tensor, Tensor]]  # rows -> (their scores, which of them are eligible)


def blockwise_best(
    block: Block, index_N: Tensor, rows: int, ranged: bool = False
) -> tuple[int, float, tuple[float, float]]:
    """``local_best`` (and, with ``ranged``, ``score_range``) of scores made ``rows`` at a time by
    ``block``, which may update those rows' state first: the same position and range as on the
    whole, with temporaries of one block. Returns (position or -1, its score, range; (inf, -inf)
    when not ``ranged``)."""
    best: tuple[float, int, int, float] | None = None  # (-score with NaN as -inf, global index, position, score)
    lo_all, hi_all = math.inf, -math.inf
    for lo in range(0, len(index_N), rows):
        sl = slice(lo, lo + rows)
        score_b, eligible_b = block(sl)
        if ranged:
            lo_b, hi_b = score_range(score_b, eligible_b)
            lo_all, hi_all = (
                (math.nan, math.nan)
                if math.isnan(lo_b) or math.isnan(lo_all)
                else (
                    min(lo_all, lo_b),
                    max(hi_all, hi_b),
                )
            )
        pos = local_best(score_b, eligible_b, index_N[sl])
        if pos < 0:
            continue
        value = float(score_b[pos])
        key = (math.inf if math.isnan(value) else -value, int(index_N[lo + pos]), lo + pos, value)
        best = key if best is None or key[:2] < best[:2] else best
    if best is None:
        return -1, -math.inf, (lo_all, hi_all)
    return best[2], best[3], (lo_all, hi_all)


def trace_solve(A_S_C_C: Tensor, N_S_C_C: Tensor) -> Tensor:
    """``tr(A^-1 N)`` per candidate (= ``tr(N A^-1)``), NaN -> -inf; singular ``A`` via pinv."""
    X_S_C_C, info_S = torch.linalg.solve_ex(A_S_C_C, N_S_C_C)
    bad_S = info_S != 0
    if bool(bad_S.any()):  # BAIT clamps inf in innerInv; a pseudo-inverse keeps it finite
        X_S_C_C[bad_S] = torch.linalg.pinv(A_S_C_C[bad_S]) @ N_S_C_C[bad_S]
    score_S = X_S_C_C.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.nan_to_num(score_S, nan=-math.inf)


def chunk_samples(C: int, D: int, itemsize: int) -> int:
    """Candidates per chunk of the O(S C d^2) passes: ``_CHUNK_ROWS`` rows and ``CHUNK_BYTES`` at most."""
    rows = min(_CHUNK_ROWS, CHUNK_BYTES // max(1, D * itemsize))
    return max(1, rows // max(C, 1))


def times(X_s_C_D: Tensor, M_D_E: Tensor) -> Tensor:
    """``X @ M`` in ``X``'s dtype and on its device; a ``M`` of another dtype or device (the driver's
    float64 ``B`` and ``F``) is converted a block of columns at a time, never as a whole copy."""
    if M_D_E.dtype == X_s_C_D.dtype and M_D_E.device == X_s_C_D.device:
        return X_s_C_D @ M_D_E
    out = X_s_C_D.new_empty(*X_s_C_D.shape[:-1], M_D_E.shape[1])
    for lo in range(0, M_D_E.shape[1], COLUMN_BLOCK):
        block = M_D_E[:, lo : lo + COLUMN_BLOCK].to(device=X_s_C_D.device, dtype=X_s_C_D.dtype)
        out[..., lo : lo + COLUMN_BLOCK] = X_s_C_D @ block
    return out


def literal_state(
    emb_S_C_D: Tensor, B_D_D: Tensor, F_D_D: Tensor, scale: float = 1.0, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """``A = I + V B V^T`` and ``N = V B F B V^T`` with ``V = scale * emb``, literally (O(S C d^2)).

    Computed in ``dtype`` (default ``B``'s) on the embeddings' device, in chunks of candidates, so
    the state never holds a second copy of the embeddings (which may be stored in a narrower dtype)
    nor of ``B`` and ``F`` (see ``times``).
    """
    dtype = dtype or B_D_D.dtype
    S, C, D = emb_S_C_D.shape
    A_S_C_C = emb_S_C_D.new_empty(S, C, C, dtype=dtype)
    N_S_C_C = emb_S_C_D.new_empty(S, C, C, dtype=dtype)
    step = chunk_samples(C, D, dtype.itemsize)
    for lo in range(0, S, step):
        V = emb_S_C_D[lo : lo + step].to(dtype) * scale
        VB = times(V, B_D_D)  # (s, C, D)
        A_S_C_C[lo : lo + step] = VB @ V.transpose(1, 2)
        N_S_C_C[lo : lo + step] = times(VB, F_D_D) @ VB.transpose(1, 2)
    A_S_C_C += torch.eye(C, dtype=A_S_C_C.dtype, device=A_S_C_C.device)
    return A_S_C_C, N_S_C_C


@dataclass(frozen=True)
class GreedyUpdate:
    """Factors of one Woodbury step ``B' = B - W G W^T`` for the sample ``U`` added/removed.

    Attributes:
        index: global index of the sample added (``sign=+1``) or removed (``sign=-1``).
        sign: +1 forward (``G = (I + U B U^T)^-1``), -1 backward (``-I`` in place of ``I``).
        W_D_C: ``B U^T`` with the old ``B``.
        Z_D_C: ``B F W``.
        G_C_C: ``(sign I + U B U^T)^-1``.
        WFW_C_C: ``W^T F W``.
        inverse_D_D: the new ``B``, sent only when a reference state asked for it.
    """

    index: int
    sign: float
    W_D_C: Tensor
    Z_D_C: Tensor
    G_C_C: Tensor
    WFW_C_C: Tensor
    inverse_D_D: Tensor | None = None


class GreedyState:
    """One shard's candidates for greedy Fisher selection.

    Everything pool-sized stays on the embeddings' device (a shard's GPU); factors that arrive from
    the driver are moved there. Embeddings may be stored in bfloat16/float16 to halve their memory;
    all arithmetic on them is done in at least float32 (``compute_dtype``), the C x C sums of the
    fast state in float64.

    Args:
        emb_N_C_D: Fisher embeddings ``V_x`` of this shard's candidates (unscaled).
        index_N: their global pool indices (int64).
        method: ``"fast"`` (incremental C x C state) or ``"reference"`` (literal eq. 12).
    """

    def __init__(
        self,
        emb_N_C_D: Tensor,
        index_N: Tensor,
        method: Literal["fast", "reference"] = "fast",
    ) -> None:
        if method not in ("fast", "reference"):
            raise ValueError(f"unknown greedy method {method!r}")
        self.emb_N_C_D = emb_N_C_D
        self.index_N = torch.as_tensor(index_N, dtype=torch.int64, device=emb_N_C_D.device)
        self.method = method
        self.compute_dtype = torch.promote_types(emb_N_C_D.dtype, torch.float32)
        # 0: candidate, 1: in the selected set, 2: removed by backward pruning
        self.status_N = torch.zeros(len(self.index_N), dtype=torch.int8, device=emb_N_C_D.device)
        self.labeled_emb_L_C_D: Tensor | None = None  # labeled rows kept for a Woodbury M_0^-1
        self.first_range: tuple[float, float] | None = None  # scores of the first forward step

    def init(self, inverse_D_D: Tensor, fisher_D_D: Tensor, scale: float) -> bool:
        """Set the embedding scale and ``B = M_0^-1``; returns whether ``B`` is needed every step."""
        self.scale = scale
        self.status_N.zero_()
        self.first_range = None
        if self.method == "reference":
            self.F_D_D, self.B_D_D = self._here(fisher_D_D), self._here(inverse_D_D)
            return True
        # the fast state never touches a d x d matrix again; its C x C sums accumulate in float64
        A_N_C_C, N_N_C_C = literal_state(self.emb_N_C_D, inverse_D_D, fisher_D_D, scale, self.compute_dtype)
        self.A_N_C_C, self.N_N_C_C = A_N_C_C.double(), N_N_C_C.double()
        return False

    def step(self, update: GreedyUpdate | None, backward: bool) -> ShardBest:
        """Apply the previous pick's ``update`` (if any), then answer this shard's best candidate.

        Forward steps rank not-yet-chosen candidates; backward steps rank chosen ones for removal.
        The fast state updates and ranks ``STEP_ROWS`` candidates at a time: a step over all of
        them at once made ~6 temporaries of the state's size at once (2.4 GB on a shard of 500,000
        candidates with C = 10), above what the memory plan counted.
        """
        fast = self.method == "fast"
        if update is not None:
            self.status_N[self.index_N == update.index] = 1 if update.sign > 0 else 2
            if not fast:
                assert update.inverse_D_D is not None, "reference states need the full inverse"
                self.B_D_D = update.inverse_D_D.to(self.B_D_D)
        factors = self._factors(update) if fast and update is not None else None
        eligible_N = self.status_N == (1 if backward else 0)

        def block(rows: slice) -> tuple[Tensor, Tensor]:
            if factors is not None:
                self._apply(factors, rows)
            return self.scores(backward, rows), eligible_N[rows]

        ranged = self.first_range is None and not backward
        per_block = STEP_ROWS if fast else max(len(self.index_N), 1)  # reference: one literal state
        pos, score, first = blockwise_best(block, self.index_N, per_block, ranged)
        if ranged:
            self.first_range = first
        if pos < 0:
            return ShardBest(-math.inf, -1)
        return ShardBest(score, int(self.index_N[pos]), self.emb_N_C_D[pos].to(self.compute_dtype) * self.scale)

    def scores(self, backward: bool = False, rows: slice = slice(None)) -> Tensor:
        """Current eq. 12 score of the local candidates ``rows`` (chosen ones included)."""
        if self.method == "reference":
            A_N_C_C, N_N_C_C = literal_state(self.emb_N_C_D[rows], self.B_D_D, self.F_D_D, self.scale)
        else:
            A_N_C_C, N_N_C_C = self.A_N_C_C[rows], self.N_N_C_C[rows]
        if backward:  # -I + V B V^T = A - 2I
            eye = torch.eye(A_N_C_C.shape[-1], dtype=A_N_C_C.dtype, device=A_N_C_C.device)
            A_N_C_C = A_N_C_C - 2 * eye
        return trace_solve(A_N_C_C, N_N_C_C)

    def _factors(self, update: GreedyUpdate) -> tuple[Tensor, Tensor, Tensor]:
        """(``[W, Z]`` scaled, ``G``, ``W^T F W``) on this state's device: what every block's update uses."""
        WZ_D_2C = self._here(torch.cat([update.W_D_C, update.Z_D_C], dim=1)) * self.scale
        return WZ_D_2C, update.G_C_C.to(self.A_N_C_C), update.WFW_C_C.to(self.A_N_C_C)

    def _apply(self, factors: tuple[Tensor, Tensor, Tensor], rows: slice) -> None:
        """The Woodbury update of the fast state's candidates ``rows``, in place."""
        WZ_D_2C, G, WFW = factors
        A_n_C_C, N_n_C_C = self.A_N_C_C[rows], self.N_N_C_C[rows]  # views: updated in place
        n, C, _ = A_n_C_C.shape
        PQ_nC_2C = self._times(WZ_D_2C, rows).to(A_n_C_C)
        P_nC_C, Q_nC_C = PQ_nC_2C[:, :C], PQ_nC_2C[:, C:]
        PG_nC_C = P_nC_C @ G
        # N' = N + PG Y^T + Y PG^T with Y = PG (W^T F W) / 2 - Q  (= N - PG Q^T - Q PG^T + PG WFW PG^T)
        Y_nC_C = PG_nC_C @ (WFW / 2) - Q_nC_C
        PG = PG_nC_C.reshape(n, C, C)
        A_n_C_C -= torch.bmm(PG, P_nC_C.reshape(n, C, C).transpose(1, 2))
        X = torch.bmm(PG, Y_nC_C.reshape(n, C, C).transpose(1, 2))
        N_n_C_C += X + X.transpose(1, 2)

    def _here(self, t: Tensor) -> Tensor:
        """A factor from the driver, on this state's device in its compute dtype."""
        return t.to(device=self.emb_N_C_D.device, dtype=self.compute_dtype)

    def _times(self, WZ_D_2C: Tensor, rows: slice) -> Tensor:
        """``emb[rows] @ WZ`` as (n C, 2C): the only O(C^2 d) work of a step (P = V W, Q = V Z).

        One (2C x d)(d x nC) GEMM over embeddings stored in the compute dtype; embeddings stored
        narrower are widened chunk by chunk, so no full-precision copy of them is ever made.
        """
        emb_n_C_D = self.emb_N_C_D[rows]
        n, C, D = emb_n_C_D.shape
        if emb_n_C_D.dtype == self.compute_dtype:
            return (WZ_D_2C.T @ emb_n_C_D.reshape(n * C, D).T).T
        out_nC_2C = WZ_D_2C.new_empty(n * C, WZ_D_2C.shape[1])
        step = chunk_samples(C, D, WZ_D_2C.element_size())
        for lo in range(0, n, step):
            part = emb_n_C_D[lo : lo + step]
            out_nC_2C[lo * C : lo * C + part.shape[0] * C] = (WZ_D_2C.T @ part.reshape(-1, D).to(WZ_D_2C).T).T
        return out_nC_2C


def woodbury_update(
    B_D_D: Tensor, F_D_D: Tensor, best: ShardBest, sign: float, send_inverse: bool
) -> tuple[Tensor, GreedyUpdate]:
    """``B`` updated in place after adding (``sign=+1``) or removing (``-1``) ``best.emb``, and the
    shard message (a reference state gets its own copy of the new ``B``)."""
    assert best.emb is not None
    U_C_D = best.emb.to(B_D_D)
    C = U_C_D.shape[0]
    W = B_D_D @ U_C_D.T
    eye = torch.eye(C, dtype=B_D_D.dtype, device=B_D_D.device)
    G, info = torch.linalg.inv_ex(sign * eye + U_C_D @ W)
    if int(info) != 0:
        G = torch.linalg.pinv(sign * eye + U_C_D @ W)
    FW = F_D_D @ W
    Z = B_D_D @ FW  # with the old B, before it is overwritten
    B_D_D.addmm_(W @ G, W.T, alpha=-1)  # B - W G W^T in place: no third d x d matrix on the driver
    update = GreedyUpdate(
        index=best.index,
        sign=sign,
        W_D_C=W,
        Z_D_C=Z,
        G_C_C=G,
        WFW_C_C=W.T @ FW,
        inverse_D_D=B_D_D.clone() if send_inverse else None,
    )
    return B_D_D, update


def greedy_select(
    call: StateCall[GreedyState],
    fisher_D_D: Tensor,
    K: int,
    *,
    n_labeled: int,
    labeled_sum_D_D: Tensor | None = None,
    lam: float = 1.0,
    backward_steps: int = 0,
    progress: Progress = no_progress,
    inverse_D_D: Tensor | None = None,
) -> list[int]:
    """Greedy FisherMask/BAIT batch selection over shard states (``GreedyState``).

    Setup as in BAIT's code: ``M_0 = lam I + labeled_sum / (n_labeled + K)`` (the labeled term is
    omitted when ``labeled_sum_D_D`` is None) and every ``V_x`` is scaled by
    ``sqrt(K / (n_labeled + K))``. ``(1 + backward_steps) K`` forward picks maximize eq. 12; then
    backward pruning removes, while more than ``K`` are chosen, the one whose removal raises
    ``tr(M^-1 F)`` least.

    Args:
        call: runs a function on every shard's ``GreedyState``.
        fisher_D_D: pool Fisher ``F``, on the driver's device (``M^-1`` is kept there too).
        K: batch size.
        n_labeled: number of labeled samples ``n_L`` (used by the scaling even without labeled_sum).
        labeled_sum_D_D: ``sum_{x in L} V_x^T V_x``, or None for no labeled initialization.
        lam: ridge ``lambda``.
        backward_steps: ``b``; oversample ``(1 + b) K`` then prune back to ``K``.
        progress: wraps the step loop (e.g. a tqdm bar); silent by default.
        inverse_D_D: ``M_0^-1`` already computed (``initial_inverse``, in ``fisher_D_D``'s dtype and
            device); then ``labeled_sum_D_D`` and ``lam`` are not used, and it is updated in place.

    Returns:
        ``K`` global indices (fewer if the pool runs out) in the order they were chosen.
    """
    if K <= 0:
        return []
    if inverse_D_D is None:
        D = fisher_D_D.shape[0]
        M0_D_D = lam * torch.eye(D, dtype=fisher_D_D.dtype, device=fisher_D_D.device)
        if labeled_sum_D_D is not None:
            M0_D_D += labeled_sum_D_D.to(fisher_D_D) / (n_labeled + K)
        inverse_D_D = torch.linalg.inv(M0_D_D)
        del M0_D_D
    B_D_D = inverse_D_D  # updated in place from here on
    scale = math.sqrt(K / (n_labeled + K))
    send_inverse = any(call(GreedyState.init, B_D_D, fisher_D_D, scale))

    chosen: list[int] = []
    update: GreedyUpdate | None = None
    bar = iter(progress(range((1 + 2 * backward_steps) * K), "greedy selection", unit="step"))
    for backward in (False, True):
        while len(chosen) > K if backward else len(chosen) < (1 + backward_steps) * K:
            next(bar, None)
            best = best_of(call(GreedyState.step, update, backward))
            update = None
            if best.index < 0:
                break
            if backward:
                chosen.remove(best.index)
            else:
                chosen.append(best.index)
            sign = -1.0 if backward else 1.0
            B_D_D, update = woodbury_update(B_D_D, fisher_D_D, best, sign, send_inverse)
    return chosen


def initial_inverse(
    D: int,
    lam: float,
    weight_count: int,
    *,
    labeled_sum_D_D: Tensor | None = None,
    labeled_emb_R_D: Tensor | None = None,
    like: Tensor,
) -> Tensor:
    """``M_0^-1 = (lam I + L / m)^-1`` with ``m = weight_count`` (``n_L + K``), ``L = sum_x V_x^T V_x``.

    From the labeled embeddings' rows ``X`` (``labeled_emb_R_D``, R = n_L C rows), by Woodbury,
    ``(1 / lam) (I - X^T (lam m I_R + X X^T)^-1 X)``: O(d^2 R) and no d x d matrix besides the
    result, the cheaper way while R < d. From the labeled sum ``L`` (``labeled_sum_D_D``), which is
    overwritten (folded into ``M_0``) so the driver never holds it next to ``M_0``: a Cholesky
    inverse. Neither given: ``I / lam``. The result is in ``like``'s dtype and on its device.
    """
    if labeled_emb_R_D is not None:
        X_R_D = labeled_emb_R_D.to(like)
        K_R_R = X_R_D @ X_R_D.T
        K_R_R.diagonal().add_(lam * weight_count)
        Y_R_D = torch.linalg.solve(K_R_R, X_R_D)
        B_D_D = X_R_D.T @ Y_R_D
        B_D_D.mul_(-1.0 / lam)
        B_D_D.diagonal().add_(1.0 / lam)
        assert B_D_D.shape == (D, D)
        return B_D_D
    if labeled_sum_D_D is None:
        B_D_D = torch.zeros(D, D, dtype=like.dtype, device=like.device)
        B_D_D.diagonal().fill_(1.0 / lam)
        return B_D_D
    M0_D_D = labeled_sum_D_D.to(like)  # the same tensor when it is in the right dtype already
    labeled_sum_D_D = None  # so that `del M0_D_D` frees it once the caller has let go of it too
    M0_D_D.div_(weight_count).diagonal().add_(lam)
    L_D_D, info = torch.linalg.cholesky_ex(M0_D_D)
    if int(info) != 0:  # not positive definite in floating point: the plain inverse
        return torch.linalg.inv(M0_D_D)
    del M0_D_D
    return torch.cholesky_inverse(L_D_D)
