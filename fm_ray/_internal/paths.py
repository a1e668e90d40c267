"""File names built from user text (dataset, setting, strategy, run ids): safe characters only.

A setting or dataset name like `../../etc` must never place a file outside `--out`: every path
component fm_ray derives from user text goes through `safe_name`.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_.=-]+")


def safe_name(text: str) -> str:
    """`text` with every run of other characters than [A-Za-z0-9_.=-] replaced by '_' and no leading
    dot, so the result is one plain path component (never '', '.', '..' or hidden)."""
    name = _UNSAFE.sub("_", str(text))
    return "_" + name if not name or name.startswith(".") else name
