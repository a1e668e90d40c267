"""The paper's imbalanced pools (settings), sampling a pool with the seed, and the initial labeled set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fm_ray.config import DataConfig
from fm_ray.errors import UserError

# The paper's settings (Gul et al., arXiv 2411.05752, section 5; docs/method.md): class -> pool count.
SETTINGS: dict[str, dict[int, int] | None] = {
    "setting1": {0: 250, 1: 5000, 2: 250, 3: 250},
    "setting2": {**{c: 250 for c in range(9)}, 9: 5000},
    "balanced": None,  # the whole train split
}


class LabeledSplits(Protocol):
    """What sampling a pool needs of a dataset: its name and the labels of both splits."""

    @property
    def name(self) -> str: ...
    @property
    def train_y(self) -> torch.Tensor: ...
    @property
    def test_y(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Pool:
    """The active-learning pool: positions 0..T-1 map to train-split indices `train_index`."""

    train_index: np.ndarray  # (T,) indices into the train split
    labels: np.ndarray  # (T,) labels remapped to 0..C-1
    classes: tuple[int, ...]  # original class id of each model output
    test_index: np.ndarray  # test-split indices restricted to `classes`
    test_labels: np.ndarray  # remapped like `labels`


def class_counts_for(cfg: DataConfig, train_y: torch.Tensor) -> dict[int, int]:
    if cfg.class_counts is not None:
        return dict(cfg.class_counts)
    if cfg.setting not in SETTINGS:
        raise UserError(
            f"unknown setting {cfg.setting!r}: choose one of {', '.join(SETTINGS)} or give --class-counts 0:250,1:5000"
        )
    counts = SETTINGS[cfg.setting]
    if counts is None:
        return {int(c): int(n) for c, n in zip(*np.unique(train_y.numpy(), return_counts=True), strict=True)}
    return counts


def sample_pool(cfg: DataConfig, data: LabeledSplits, seed: int) -> Pool:
    """Sample the pool per class with the seed; restrict the test split to the same classes."""
    counts = class_counts_for(cfg, data.train_y)
    train_y = data.train_y.numpy()
    rng = np.random.default_rng([seed, 0])
    picked = []
    for c in sorted(counts):
        members = np.flatnonzero(train_y == c)
        if counts[c] > len(members):
            raise UserError(
                f"class {c} of {data.name} has {len(members)} train samples, {counts[c]} asked: lower its count"
            )
        picked.append(rng.choice(members, size=counts[c], replace=False))
    train_index = np.sort(np.concatenate(picked))
    classes = tuple(sorted(counts))
    remap = {c: i for i, c in enumerate(classes)}
    test_y = data.test_y.numpy()
    test_index = np.flatnonzero(np.isin(test_y, classes))
    return Pool(
        train_index=train_index,
        labels=np.array([remap[int(c)] for c in train_y[train_index]], dtype=np.int64),
        classes=classes,
        test_index=test_index,
        test_labels=np.array([remap[int(c)] for c in test_y[test_index]], dtype=np.int64),
    )


def initial_labeled(pool_size: int, init: int, seed: int) -> np.ndarray:
    """The seeded random initial labeled set (pool positions, sorted)."""
    return np.sort(np.random.default_rng([seed, 1]).choice(pool_size, size=init, replace=False))
