"""Test hook for crash tests: `FM_RAY_FAULT=<phase>:<round>` makes the process SIGKILL itself there.

Only tests set it (tests/test_faults_run.py). A SIGKILL runs no cleanup and no `finally`, like a
power cut or the OOM killer, so whatever the run directory holds at that point is what a resume sees.
"""

from __future__ import annotations

import os
import signal

# The named points of a round, in order (loop.py calls `fault_point` at each).
PHASES = ("train", "eval", "query", "queries_written", "rows_written", "checkpointed")


def fault_point(phase: str, round_: int) -> None:
    """SIGKILL this process if $FM_RAY_FAULT names this phase and round; a no-op otherwise."""
    spec = os.environ.get("FM_RAY_FAULT")
    if spec and spec == f"{phase}:{round_}":
        os.kill(os.getpid(), signal.SIGKILL)
