"""fm_ray's output: stdlib `logging` under the `fm_ray` logger, and progress bars.

A library stays silent unless its caller configures logging (the logging HOWTO's advice for
libraries): `fm_ray.select` and `PoolSession` print nothing by default. `fm-ray` (and only it)
calls `configure_cli_logging`, the one place that installs a handler: INFO lines on stdout
("[fm-ray HH:MM:SS] ..."), -q for warnings only, -v for debug; Ray's, Ray Data's and Tune's own
loggers are turned down to warnings there too. Bars show only on a terminal and only when fm_ray's
INFO lines would show, and stay on screen when they finish.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

LOGGER = logging.getLogger("fm_ray")
LOGGER.addHandler(logging.NullHandler())  # no "last resort" stderr output for an unconfigured caller
# Loggers of the libraries fm_ray drives: INFO chatter there (a started instance, Tune's banner,
# Ray Data's per-operator lines) is noise to an fm_ray user; their warnings and errors still show.
NOISY = ("ray", "ray.data", "ray.tune", "ray.train", "filelock")


def log(msg: str, level: int = logging.INFO) -> None:
    """One line of fm_ray's progress (the thin call sites' helper)."""
    LOGGER.log(level, msg)


def cli_level(verbose: int = 0, quiet: int = 0) -> int:
    """-v / -q counts -> a logging level: INFO by default, DEBUG with -v, WARNING with -q, ERROR with -qq."""
    steps = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]
    return steps[max(0, min(len(steps) - 1, 1 - verbose + quiet))]


class _StdoutHandler(logging.Handler):
    """Writes to the sys.stdout of the moment (pytest's capture, a redirect), not the one at setup."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        tag = "" if record.levelno == logging.INFO else f" {record.levelname.lower()}"
        return f"[fm-ray {stamp}{tag}] {record.getMessage()}"


def configure_cli_logging(level: int = logging.INFO) -> None:
    """`fm-ray`'s output: fm_ray lines at `level` on stdout, other libraries' at warnings. Idempotent."""
    for h in [h for h in LOGGER.handlers if isinstance(h, _StdoutHandler)]:
        LOGGER.removeHandler(h)
    handler = _StdoutHandler()
    handler.setFormatter(_Format())
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False  # one line per message, whatever the root logger has
    for name in NOISY:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def shows(level: int = logging.INFO) -> bool:
    """Whether a message at `level` reaches a real handler (not only the NullHandler)."""
    if not LOGGER.isEnabledFor(level):
        return False
    logger: logging.Logger | None = LOGGER
    while logger is not None:
        if any(not isinstance(h, logging.NullHandler) and level >= h.level for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False  # the NullHandler above keeps logging's last resort away too


def _bars() -> bool:
    return sys.stderr.isatty() and shows(logging.INFO)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A tqdm bar (rate, time left) on a terminal; nothing when stderr is not one (logs, CI, Ray
    workers) or when fm_ray's INFO lines are off (the Python API by default, `fm-ray -q`)."""
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=f"[fm-ray] {desc}", total=total, unit=unit, disable=not _bars(), leave=True)


class EpochProgress:
    """A round's training progress: a tqdm bar with loss and accuracy on a terminal, else an INFO
    line every `every` epochs (and at the last one)."""

    def __init__(self, total: int, desc: str, every: int | None = None):
        self.total, self.desc = total, desc
        self.every = every or max(1, total // 5)
        self._bar: Any = None
        if _bars():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=f"[fm-ray] {desc}", unit="epoch", leave=True)

    def update(self, epoch: int, loss: float, accuracy: float, last: bool = False) -> None:
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", refresh=False)
            self._bar.update(1)
        elif epoch % self.every == 0 or last:
            log(f"{self.desc}: epoch {epoch}/{self.total}, loss {loss:.4f}, train acc {accuracy:.3f}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
