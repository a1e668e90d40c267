"""The `fm-ray` command watches the process that does its work, for the ends no Python code sees.

Some ends leave no room for the boundary's one line: Ray's core worker ends a driver with `_Exit(1)`
when its local raylet dies (killed by a user or by the out-of-memory killer), and a SIGKILL ends any
process at once. The command would stop with Ray's log dump, or with nothing at all. So the console
command `fm-ray` runs `cli.main` in a child process and waits for it. The child tells the watcher
over a pipe how its command goes on after an interruption and, from a `finally`, that it ended by
itself; a child that ends without saying so ended abruptly, and the watcher prints the one line and
exits 1.

The child runs in its own session, so a terminal's Ctrl+C or a process-group signal reaches it once,
forwarded by the watcher; it dies with the watcher (PR_SET_PDEATHSIG, on Linux). FM_RAY_DEBUG=1,
and a plain `python -m fm_ray.cli`, run the command unwatched, in one process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from fm_ray._internal.procenv import compute_env

WATCH_FD = "FM_RAY_WATCH_FD"  # the pipe's write end, passed to a watched child
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_told: int | None = None  # in a watched child: the pipe's write end (taken out of the environment)


def say(kind: str, text: str = "") -> None:
    """In a watched child, tell the watcher `kind text` (a no-op elsewhere): `next <how to go on>`
    once the command is known, `ended` when the child ends by itself."""
    if _told is not None:
        with contextlib.suppress(OSError):
            os.write(_told, f"{kind} {text}".replace("\n", " ").encode() + b"\n")


def abrupt_line(returncode: int, how: str) -> str:
    """The watcher's line for a child that ended without a word (`how`: what is kept, how to go on)."""
    why = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit code {returncode}"
    return (
        f"fm-ray: error: the process doing the work ended abruptly ({why}), before fm_ray could say why: "
        "the out-of-memory killer, a SIGKILL, or a dead Ray raylet end a process so (`dmesg`, `ray status` "
        f"and Ray's message above tell which); {how}"
    )


def watch(cmd: list[str]) -> int:
    """Run `cmd` as a watched child; its exit status, or 1 and the abrupt line when it ended abruptly."""
    read_fd, write_fd = os.pipe()
    started: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []  # signals that came before the child existed: it gets them once it does

    def forward(signum: int, frame: object) -> None:
        if not started:
            pending.append(signum)
        for child in started:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    before = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        started.append(
            subprocess.Popen(
                cmd,
                env={**os.environ, **compute_env(), WATCH_FD: str(write_fd)},
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        )
        os.close(write_fd)
        for signum in pending:
            started[0].send_signal(signum)
        code = started[0].wait()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    os.set_blocking(read_fd, False)
    told = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(read_fd, 65536):
            told += chunk
    os.close(read_fd)
    said = [line.partition(" ") for line in told.decode(errors="replace").splitlines()]
    if code == 0 or any(kind == "ended" for kind, _, _ in said):
        return code
    how = next((text for kind, _, text in said if kind == "next"), "run the command again")
    print(abrupt_line(code, how), file=sys.stderr, flush=True)
    return 1


def _die_with_parent() -> None:
    """A watched child ends when its watcher does (SIGTERM: a clean end), not as an orphan."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def entry() -> None:
    """The console command `fm-ray`: `fm_ray.cli` in a watched child (in this process's place with
    FM_RAY_DEBUG=1)."""
    cmd = [sys.executable, "-m", "fm_ray.cli", *sys.argv[1:]]
    if os.environ.get("FM_RAY_DEBUG", "") not in ("", "0"):
        os.execv(sys.executable, cmd)  # one process, as a debugger wants it
    sys.exit(watch(cmd))


def child(main: Callable[[], int]) -> None:
    """`python -m fm_ray.cli`: `main` here, telling a watcher (if one started this process) that it
    ended by itself; a plain `python -m fm_ray.cli` is not watched."""
    global _told
    if WATCH_FD in os.environ:  # taken out: this process's own children (Ray's, a nested fm-ray) are not
        with contextlib.suppress(ValueError, OSError):
            _told = int(os.environ.pop(WATCH_FD))
            os.set_inheritable(_told, False)
        _die_with_parent()
    try:
        sys.exit(main())
    finally:
        say("ended")  # any end that runs Python, after the command's own line
