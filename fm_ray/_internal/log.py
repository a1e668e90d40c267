"""Progress lines and bars, one format for the loop, the strategies' phases and packing."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def log(msg: str) -> None:
    print(f"[fm-ray {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A tqdm bar (rate, time left) on a terminal; silent when stderr is not a terminal (logs, CI, Ray)."""
    from tqdm.auto import tqdm

    yield from tqdm(
        items, desc=f"[fm-ray] {desc}", total=total, unit=unit, disable=not sys.stderr.isatty(), leave=False
    )
