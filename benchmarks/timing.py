"""Wall-clock timing shared by the benchmarks: CUDA work is synchronized before and after."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def timed(device: str, fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, result) of `fn()`, with queued CUDA kernels finished on both sides."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out
