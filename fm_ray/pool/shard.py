"""One shard of the pool: its images, their global pool positions, and the per-sample state a
strategy builds. The local pool calls it in-process; the Ray pool wraps the same class in an actor."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

from fm_ray.config import ModelConfig
from fm_ray.core import badge, fisher, kcenter, scores
from fm_ray.core.greedy import GreedyState
from fm_ray.models import build_model
from fm_ray.pool.source import ImageSource, read_all
from fm_ray.train import Normalizer, predict

BLOCK = 256  # inference batch; shards are cut on multiples of it (see pool.partition)
DTYPES = {"float32": torch.float32, "float64": torch.float64}  # Fisher compute dtypes


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Everything a shard needs to rebuild the model: plain data, cheap to ship to an actor."""

    model: ModelConfig | None  # None: `module` is the model
    channels: int
    side: int
    n_classes: int
    norm: Normalizer
    device: str
    module: torch.nn.Module | None = None  # a user's own model (fm_ray.select), copied onto each shard


class PoolShard:
    def __init__(self, spec: ShardSpec, images: ImageSource | torch.Tensor, index_N: np.ndarray):
        """`images`: this shard's images, position i = pool position `index_N[i]`; a Parquet source
        is read here, in the shard's own process, so its pixels never pass through the driver."""
        self.spec = spec
        self.x_u8 = read_all(images)
        self.index_N = torch.as_tensor(index_N, dtype=torch.long)
        self.device = torch.device(spec.device)
        if spec.module is not None:
            self.model = copy.deepcopy(spec.module)
        else:
            assert spec.model is not None
            # weights come from the driver each round (set_round): never re-read ImageNet or --checkpoint here
            self.model = build_model(
                dataclasses.replace(spec.model, pretrained=False, checkpoint=None),
                spec.channels,
                spec.side,
                spec.n_classes,
            )
        self.labeled_N = torch.zeros(len(index_N), dtype=torch.bool)
        self.state: Any = None
        self._preds: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- round set-up ---------------------------------------------------------------------------
    def set_round(self, weights: dict[str, torch.Tensor] | None, labeled: np.ndarray) -> None:
        """New model weights (None: keep) and the labeled set (global positions); clears caches."""
        if weights is not None:
            self.model.load_state_dict(weights)
        self.model.to(self.device).eval()
        self.labeled_N = torch.from_numpy(np.isin(self.index_N.numpy(), labeled))
        self.state, self._preds = None, None

    def _predictions(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._preds is None:
            self._preds = predict(self.model, self.x_u8, self.spec.norm, self.device, batch=BLOCK)
        return self._preds

    def _inputs(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.spec.norm(self.x_u8[rows]).to(self.device, dtype)

    def _model_in(self, dtype: torch.dtype) -> torch.nn.Module:
        """The model in the Fisher compute dtype (float64 on request: a copy)."""
        return self.model if dtype == torch.float32 else copy.deepcopy(self.model).to(dtype)

    # -- uncertainty ----------------------------------------------------------------------------
    def top_scores(self, score: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        probs, _ = self._predictions()
        free = ~self.labeled_N
        return scores.top_k(scores.SCORES[score](probs[free]), self.index_N[free], k)

    # -- Fisher ---------------------------------------------------------------------------------
    def fisher_diag_sum(self, positions: np.ndarray, chunk_size: int, dtype: str) -> tuple[torch.Tensor, int]:
        """Partial float64 sum over this shard's members among `positions`, for the driver to add up."""
        rows = torch.from_numpy(np.flatnonzero(np.isin(self.index_N.numpy(), positions)))
        model, dt = self._model_in(DTYPES[dtype]), DTYPES[dtype]
        total = torch.zeros(sum(p.numel() for p in self.model.parameters()), dtype=torch.float64)
        for chunk in rows.split(BLOCK):
            total += fisher.fisher_diag_sum(model, self._inputs(chunk, dt), chunk_size=chunk_size).cpu()
        return total, len(rows)

    def build_greedy(
        self, mask_idx: torch.Tensor | None, method: str, chunk_size: int, dtype: str
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Fisher embeddings of every member (`mask_idx` None: last layer, i.e. BAIT); keeps the
        unlabeled ones as greedy candidates and returns partial float64 (pool sum, labeled sum, count)
        of V^T V, accumulated block by block so no float64 copy of all embeddings is ever made."""
        dt = DTYPES[dtype]
        if mask_idx is None:
            probs, feats = self._predictions()
            emb_N_C_D = fisher.last_layer_embeddings(probs.to(dt), feats.to(dt))
        else:
            model = self._model_in(dt)
            parts = [
                fisher.fisher_embeddings(model, self._inputs(chunk, dt), mask_idx, chunk_size=chunk_size).cpu()
                for chunk in torch.arange(len(self.index_N)).split(BLOCK)
            ]
            emb_N_C_D = torch.cat(parts)
        D = emb_N_C_D.shape[-1]
        pool_sum = torch.zeros(D, D, dtype=torch.float64)
        labeled_sum = torch.zeros(D, D, dtype=torch.float64)
        for rows in torch.arange(len(self.index_N)).split(BLOCK):
            block = emb_N_C_D[rows].double()
            flat, lab = block.reshape(-1, D), block[self.labeled_N[rows]].reshape(-1, D)
            pool_sum += flat.T @ flat
            labeled_sum += lab.T @ lab
        free = ~self.labeled_N
        self.state = GreedyState(emb_N_C_D[free], self.index_N[free], method=method)
        return pool_sum, labeled_sum, len(self.index_N)

    # -- diversity ------------------------------------------------------------------------------
    def labeled_feats(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, feats = self._predictions()
        return feats[self.labeled_N], self.index_N[self.labeled_N]

    def build_kcenter(self) -> None:
        _, feats = self._predictions()
        free = ~self.labeled_N
        self.state = kcenter.KCenterState(feats[free], self.index_N[free])

    def build_badge(self) -> None:
        probs, feats = self._predictions()
        free = ~self.labeled_N
        self.state = badge.KMeansPPState(badge.badge_embeddings(probs[free], feats[free]), self.index_N[free])

    # -- the selection drivers talk to the state through this -----------------------------------
    def state_call(self, method: str, *args: Any) -> Any:
        return getattr(self.state, method)(*args)

    def state_bytes(self) -> int:
        """Bytes of tensors held by the current selection state (per-shard memory report)."""
        if self.state is None:
            return 0
        return sum(v.numel() * v.element_size() for v in vars(self.state).values() if isinstance(v, torch.Tensor))
