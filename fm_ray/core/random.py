"""Counter-based uniforms keyed by (seed, step, global index).

A sample's random number depends only on its key, never on which shard holds it or in what order,
so shard-wise sampling (BADGE's k-means++ seeding) is exactly partition-invariant.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 (Steele, Lea, Flood 2014) of a uint64 array, elementwise, wrapping arithmetic."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, step: int, index_N: Tensor) -> Tensor:
    """Uniforms in the open interval (0, 1), float64, one per global index, keyed by (seed, step).

    Args:
        seed: any Python int (taken modulo 2^64).
        step: selection step counter.
        index_N: global pool indices (int64, >= 0).

    Returns:
        float64 tensor on ``index_N``'s device.
    """
    key = np.array([seed & _MASK64], dtype=np.uint64)
    key = splitmix64(splitmix64(key) ^ np.uint64(step & _MASK64))
    idx = index_N.detach().cpu().numpy().astype(np.uint64)
    z = splitmix64(key ^ splitmix64(idx))
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # 53 bits, never 0 or 1
    return torch.from_numpy(u).to(index_N.device)
