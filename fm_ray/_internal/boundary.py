"""The one error boundary of `fm-ray` and of `fm_ray.select`: every failure ends as one line and a code.

As pip's `Command._run_wrapper` (one ordered ladder of expected errors) and black's `dump_to_file`
(an unexpected error's details go to a log file, the console gets one line naming it):

    UserError                                   -> its line, exit 2 (bad input)
    OSError ENOSPC/EDQUOT/EACCES/EPERM/EROFS/ENOTDIR/EISDIR, Ray connection or node failures
                                                -> one line naming the path (or cluster) and the fix, exit 1
    KeyboardInterrupt / SIGTERM                 -> the command's resume line, exit 130 / 143
    anything else                               -> "internal error (Type: first line), details in <log>",
                                                   traceback, argv and versions in <log>, exit 1

`FM_RAY_DEBUG=1` skips the ladder (the raw exception propagates); `fm-ray -v` prints the traceback
of an internal error as well. The Python API raises `InternalError` (the line, `.cause`) instead.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import platform
import re
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fm_ray._internal.files import cache_dir
from fm_ray.errors import InternalError, UserError

EXIT_ENVIRONMENT = 1  # the run itself failed: disk, permissions, cluster; or an internal error
EXIT_USAGE = 2  # bad input
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143

# errno -> what the user does about it (the path comes from the exception)
_ENV_FIX = {
    errno.ENOSPC: "free space on that disk or write somewhere else, then run the command again",
    errno.EDQUOT: "free space within your quota or write somewhere else, then run the command again",
    errno.EACCES: "give yourself access to it or choose a path you can write to",
    errno.EPERM: "give yourself access to it or choose a path you can write to",
    errno.EROFS: "that file system is read-only: choose a writable path",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path or move the file",
    errno.EISDIR: "that path is a folder where a file is expected: choose another path",
}
# Ray's failures of the cluster itself (not of fm_ray's code), by class name: ray stays unimported
_RAY_ENV = {
    "LocalRayletDiedError",
    "NodeDiedError",
    "RaySystemError",
    "RpcError",
    "AuthenticationError",
    "OutOfDiskError",
    "ObjectStoreFullError",
    "OutOfMemoryError",
    "WorkerCrashedError",
}
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)  # Arrow's OSErrors carry errno in the text


EXIT_PIPE = 128 + signal.SIGPIPE  # 141: as a command killed by SIGPIPE, the shell's usual pipe end


def stdout_gone(exc: BaseException) -> bool:
    """`exc` is stdout's reader going away (`fm-ray strategies | head -1`), not a Ray socket's: then
    stdout is pointed at /dev/null, so the interpreter's last flush says nothing either."""
    if not isinstance(exc, BrokenPipeError):
        return False
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout (a test's capture)
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: every `except KeyboardInterrupt` cleanup runs for it too."""


def debug() -> bool:
    """FM_RAY_DEBUG=1: no boundary, the raw exception propagates (for debuggers and bug reports)."""
    return os.environ.get("FM_RAY_DEBUG", "") not in ("", "0")


@dataclass(frozen=True)
class Outcome:
    code: int
    line: str
    log: Path | None = None  # the internal error's details


def _root(exc: BaseException) -> BaseException:
    """The exception a Ray task or actor raised (RayTaskError.cause), else `exc` itself."""
    seen = 0
    while type(exc).__name__.startswith("RayTaskError") and isinstance(getattr(exc, "cause", None), BaseException):
        exc, seen = exc.cause, seen + 1  # type: ignore[attr-defined]
        if seen > 10:
            break
    return exc


def _errno(exc: OSError) -> int | None:
    if exc.errno is not None:
        return exc.errno
    found = _ERRNO_IN_TEXT.search(str(exc))
    return int(found.group(1)) if found else None


def summary(exc: BaseException, width: int = 120) -> str:
    """`Type: first line of the message`, cut to `width` characters (a remote traceback is never whole)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return line if len(line) <= width else line[: width - 3] + "..."


def environment_line(exc: BaseException) -> str | None:
    """One line naming the path (or the cluster) and the fix, for an expected environment failure; else None."""
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
        code = _errno(exc)
        if code in _ENV_FIX:
            where = " or ".join(str(f) for f in (exc.filename, exc.filename2) if f) or "a file fm_ray writes"
            return f"{os.strerror(code)}: {where}: {_ENV_FIX[code]}"
        return None
    if isinstance(exc, ConnectionError) or type(exc).__name__ in _RAY_ENV:
        return (
            f"the Ray cluster failed ({summary(exc)}): check that it is up (`ray status`) and --ray-address, "
            "then run the command again (a run continues with --resume)"
        )
    return None


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("fm_ray", "torch", "ray", "numpy", "pyarrow"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return f"Python {platform.python_version()} ({sys.executable}) on {platform.platform()}; " + ", ".join(found)


def write_log(exc: BaseException, argv: Sequence[str] | None, folder: Path | None) -> Path | None:
    """The traceback, argv and versions in a new file in `folder` (the run's), else the user's cache."""
    text = (
        f"fm_ray internal error at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        f"argv: {list(argv) if argv is not None else sys.argv}\n"
        f"{versions()}\n\n" + "".join(traceback.format_exception(exc))
    )
    name = f"fm-ray-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for where in ([folder] if folder is not None else []) + [cache_dir() / "errors"]:
        with contextlib.suppress(OSError):
            where.mkdir(parents=True, exist_ok=True)
            (where / name).write_text(text, encoding="utf-8", errors="backslashreplace")
            return where / name
    return None


def outcome(
    exc: BaseException,
    argv: Sequence[str] | None = None,
    log_dir: Path | None = None,
    interrupted: str = "interrupted",
) -> Outcome:
    """Where `exc` ends: its code and its one line (without the `fm-ray: ` prefix); an internal error's log."""
    root = _root(exc)
    if isinstance(root, UserError):
        return Outcome(EXIT_USAGE, f"error: {root}")
    if isinstance(exc, KeyboardInterrupt) or terminated(exc):
        code = EXIT_INTERRUPTED if type(exc) is KeyboardInterrupt else EXIT_TERMINATED
        return Outcome(code, interrupted)
    if isinstance(root, InternalError):
        return Outcome(EXIT_ENVIRONMENT, str(root), Path(root.log) if root.log else None)
    env = environment_line(root)
    if env is not None:
        return Outcome(EXIT_ENVIRONMENT, f"error: {env}")
    log = write_log(exc, argv, log_dir)
    where = f"details in {log}" if log is not None else "details could not be written (no writable folder)"
    return Outcome(EXIT_ENVIRONMENT, f"internal error ({summary(root)}), {where}", log)


def terminated(exc: BaseException) -> bool:
    """SIGTERM: ours (`Terminated`) or Ray's driver handler's `sys.exit(signal.SIGTERM)`."""
    return isinstance(exc, Terminated) or (isinstance(exc, SystemExit) and exc.code == signal.SIGTERM)


def _raise_terminated(signum: int, frame: Any) -> None:
    # Ray's C++ failure-signal handler (absl's) saw SIGTERM first and armed alarm(3) to abort the
    # process (exit 134) unless it ends within 3 s: our cleanup (cancel, shut Ray down) may take longer
    signal.alarm(0)
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` in the main thread. `ray.init` replaces the handler
    by its own `sys.exit(15)`: fm_ray's calls are wrapped in `keep_sigterm`, and `terminated` counts
    that SystemExit as SIGTERM too (a caller's own `ray.init`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def keep_sigterm() -> Iterator[None]:
    """Around `ray.init`, which replaces the SIGTERM handler by its own `sys.exit`: keep the boundary's."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if before is _raise_terminated:
            signal.signal(signal.SIGTERM, before)


F = TypeVar("F", bound=Callable[..., Any])


def api(fn: F) -> F:
    """The boundary of a Python entry point: bad input and environment failures propagate as they
    are (`UserError`, `OSError`, KeyboardInterrupt); anything else becomes `InternalError` (one line,
    the original as `.cause`, the traceback in a log file). FM_RAY_DEBUG=1 lets it propagate raw."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if debug() or isinstance(e, InternalError):
                raise
            root = _root(e)
            if isinstance(root, UserError):
                raise root from None
            if environment_line(root) is not None:
                raise
            out = outcome(e, argv=[f"fm_ray.{fn.__name__}(...)"])
            raise InternalError(f"fm_ray: {out.line}", e, str(out.log) if out.log else None) from None

    return wrapper  # type: ignore[return-value]
