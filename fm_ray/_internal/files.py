"""fm_ray's cache folder and the one atomic write (local paths and object stores).

Several processes (Ray Tune trials, two runs started together) share one cache, so every file is
written under a unique temporary name in its final folder and renamed into place: a reader sees
the old file or the new one, never half of one, and two writers never touch the same temporary.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fm_ray.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs


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


def check_folder_target(path: Path, flag: str) -> None:
    """Fail before any work if `path` cannot become a folder we write in: it (or a parent) is a
    file, or the nearest existing folder is not writable. `flag` names the argument in the message."""
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        what = f"{flag} {path}" + ("" if target == path else f": {target}")
        raise UserError(f"{what} is a file, not a folder: give a folder path for {flag}")
    try:
        tempfile.TemporaryFile(dir=target).close()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {target} ({e.strerror}): give a writable folder") from None


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a failed write() or fsync() (disk full) names no file by itself
        raise


# Object stores with no rename: pyarrow's move there is a copy and a delete (a reader can see the
# temporary, a crash leaves it behind), while one PUT is atomic already (the object appears whole).
_NO_RENAME = {"s3", "s3a", "gcs", "gs", "abfs", "abfss", "az"}


def _renames(fs: pafs.FileSystem) -> bool:
    """False for object stores, pyarrow's own (s3, gcs, abfs) or fsspec's through pyarrow (py::fsspec+s3)."""
    return not set(re.findall(r"[a-z0-9]+", fs.type_name.removeprefix("py::").removeprefix("fsspec+"))) & _NO_RENAME


def write_bytes_atomically(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` on a pyarrow filesystem so that a reader sees the old file or the whole
    new one, and two writers of one path leave one of their files whole.

    Local paths go through `write_atomically` (unique temporary, fsync, rename); object stores get a
    single direct PUT; any other filesystem a unique temporary name and its own rename."""
    parent = path.rsplit("/", 1)[0]
    if fs.type_name == "local":
        Path(parent).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(path), lambda f: f.write(data))
        return
    fs.create_dir(parent, recursive=True)
    if not _renames(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
