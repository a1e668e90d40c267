"""Where a pool's pixels come from: an `ImageSource` reads uint8 images by position.

Two implementations of the same thing: `TensorImages` (a dataset already in RAM) and
`fm_ray.data.parquet.ParquetImages` (rows of a packed Parquet pool, read on demand). The driver
reads only what it trains and evaluates on; each shard gets `subset(its positions)`, a small
picklable object for Parquet, and reads its images block by block on every pass (`PoolShard.stream`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class ImageSource(Protocol):
    shape: tuple[int, int, int]  # (channels, H, W) of every image

    def __len__(self) -> int: ...

    def read(self, positions: np.ndarray) -> torch.Tensor:
        """uint8 (len(positions), C, H, W), in the order of `positions`."""
        ...

    def subset(self, positions: np.ndarray) -> ImageSource:
        """The images at `positions` as a new source whose position i is `positions[i]` here."""
        ...

    def close(self) -> None:
        """Drop what the last reads kept for the next one (an open file, a decoded row group)."""
        ...


class TensorImages:
    """Images already in memory: uint8 (N, C, H, W)."""

    shape: tuple[int, int, int]

    def __init__(self, x_N_C_H_W: torch.Tensor):
        self.x_N_C_H_W = x_N_C_H_W
        self.shape = tuple(x_N_C_H_W.shape[1:])  # type: ignore[assignment]  # (C, H, W); (F,) for feature rows

    def __len__(self) -> int:
        return len(self.x_N_C_H_W)

    def read(self, positions: np.ndarray) -> torch.Tensor:
        return self.x_N_C_H_W[torch.as_tensor(np.asarray(positions), dtype=torch.long)]

    def subset(self, positions: np.ndarray) -> TensorImages:
        return TensorImages(self.read(positions))

    def close(self) -> None:
        pass  # nothing kept between reads


def as_source(images: ImageSource | torch.Tensor) -> ImageSource:
    return TensorImages(images) if isinstance(images, torch.Tensor) else images


def read_all(images: ImageSource | torch.Tensor) -> torch.Tensor:
    """Every image of a source (what a shard holds), without a copy for an in-RAM tensor."""
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, TensorImages):
        return images.x_N_C_H_W
    return images.read(np.arange(len(images)))
