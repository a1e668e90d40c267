"""What a source holds, item by item, so a pack can tell whether the source changed under it.

A listing is one `Item` per source item of a split, in the order packed: its id, its label (None
when unlabeled), its size in bytes and a content digest (sha256 of the image file, or of the raw
pixels for the built-in datasets). `fm-ray pack` records it when a pack begins, and each part file
records the digest of the slice it holds (`slice_digest`), so a resumed pack keeps exactly the
files whose items did not change.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np


class Item(NamedTuple):
    id: str
    label: int | None
    bytes: int
    sha256: str


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_listing(items: Sequence[tuple[str, str, int | None]]) -> list[Item]:
    """items: (file path, id, label or None) -> their listing; unreadable files get the digest ''
    (the decoder names them when it reads them)."""

    def one(item: tuple[str, str, int | None]) -> Item:
        path, name, label = item
        try:
            return Item(name, label, os.path.getsize(path), _file_sha256(path))
        except OSError:
            return Item(name, label, -1, "")

    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:  # hashlib drops the GIL
        return list(pool.map(one, items, chunksize=64))


def array_listing(ids: Sequence[str], labels: Sequence[int] | None, x_N: np.ndarray) -> list[Item]:
    """In-memory images (uint8, N x ...) -> their listing, one digest of the raw bytes per image."""
    flat = np.ascontiguousarray(x_N).reshape(len(x_N), -1)
    labs = list(labels) if labels is not None else [None] * len(x_N)
    return [
        Item(i, None if y is None else int(y), row.nbytes, hashlib.sha256(row.data).hexdigest())
        for i, y, row in zip(ids, labs, flat, strict=True)
    ]


def slice_digest(classes: Sequence[str] | None, items: Sequence[Item]) -> str:
    """One digest of what determines a part file's rows: the class list (label indices depend on it)
    and its items."""
    text = json.dumps([list(classes) if classes is not None else None, [list(i) for i in items]])
    return hashlib.sha256(text.encode()).hexdigest()
