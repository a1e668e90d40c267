"""uint8 images -> normalized float model inputs (what the driver, the shards and projects all feed a model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Normalizer:
    """uint8 images -> normalized float inputs, optionally with RandomCrop(pad 4) + flip.

    Empty `mean`/`std`: no normalization (float inputs pass through; uint8 is scaled to [0, 1]).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x_u8: torch.Tensor, augment: bool = False) -> torch.Tensor:
        x = x_u8.float().div_(255) if x_u8.dtype == torch.uint8 else x_u8.float()
        if augment:
            x = _augment(x)
        if not self.mean:  # no statistics: inputs are used as given (already-transformed user data)
            return x
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


def _augment(x_N_Ch_H_W: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms import v2

    side = x_N_Ch_H_W.shape[-1]
    tf = v2.Compose([v2.RandomCrop(side, padding=4), v2.RandomHorizontalFlip()])
    return torch.stack([tf(img) for img in x_N_Ch_H_W])  # per image: each gets its own crop and flip
