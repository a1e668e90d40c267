"""fm_ray's cache folder and the two rules for writing into it.

Several processes (Ray Tune trials, two runs started together) share one cache, so every file is
written under a unique temporary name in its final folder and renamed into place: a reader sees
the old file or the new one, never half of one, and two writers never touch the same temporary.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from fm_ray.errors import UserError


def cache_dir() -> Path:
    base = os.environ.get("FM_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fm_ray"
    )
    return Path(base)


def offline() -> bool:
    """FM_RAY_OFFLINE set: never download (a missing dataset or weight file is a clear error at once)."""
    return os.environ.get("FM_RAY_OFFLINE", "") not in ("", "0")


def writable_dir(folder: Path) -> Path:
    """Create `folder` if needed and prove a file can be written there; else one clear UserError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise UserError(
            f"cache folder {folder} is not writable ({e.strerror or type(e).__name__}): "
            "point FM_RAY_CACHE at a folder you can write to"
        ) from None
    return folder


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import (os.umask can only be read by setting it)


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(file)` on a fresh temporary file beside `path`, then rename it to `path`.

    The file is on disk (fsync) before the rename, so a crash leaves the old file or the whole new
    one; the temporary name is unique, so two processes writing one path never collide."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600: give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
