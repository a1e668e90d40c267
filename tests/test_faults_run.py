"""Process kills: SIGKILL `fm-ray run` / `fm-ray sweep` at each phase, resume, compare with an uninterrupted run.

`FM_RAY_FAULT=<phase>:<round>` (fm_ray/faults.py) makes the run kill itself at that point, like a
power cut: no cleanup, no `finally`. Each chain below kills one run directory several times, at
later and later points, then resumes it to the end. After every kill the rows on disk must be a
prefix of the uninterrupted run's rows (nothing wrong is ever written), and in the end rounds.parquet
and queries.parquet must equal the uninterrupted run's, timings aside. Rows finished before a kill
must survive it (their timings are unchanged), except a warm-start round whose weights never landed,
which is redone by design.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from fm_ray.cli import build_parser, config_from_args
from fm_ray.run._faults import PHASES
from fm_ray.run.recipe import run_experiment
from fm_ray.run.rundir import TIMING_COLUMNS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "fashion_mnist", "--class-counts", "0:40,1:60", "--model", "cnn", "--strategy", "entropy",
         "--init", "20", "--batch", "10", "--rounds", "2", "--epochs", "1", "--seed", "3",
         "--backend", "local", "--device", "cpu"]  # fmt: skip
KILLED = -signal.SIGKILL

# (warm start, kills in order). Together they hit every phase; the warm chain hits the two cases of
# the old bug: a crash between a round's row and its weights, in round 0 and in a later round.
CHAINS = {
    "cold": (False, ["train:0", "query:0", "queries_written:1", "rows_written:1", "checkpointed:2"]),
    "warm": (True, ["rows_written:0", "rows_written:1", "eval:2"]),
}


def env(fault: str | None = None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "FM_RAY_FAULT"}
    # one thread, as the in-process reference: CPU float sums depend on the thread count
    e.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **({"FM_RAY_FAULT": fault} if fault else {}))
    return e


def fm_ray(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fm_ray.cli", *args]
    return subprocess.run(cmd, env=env(fault), capture_output=True, text=True, timeout=600)


def read(path: Path, name: str) -> list[dict]:
    return pq.read_table(path / name).to_pylist() if (path / name).exists() else []


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(strategy, warm) -> the dir of one uninterrupted run of SMALL with that strategy and
    warm start, computed once per module, in-process with one thread (as the subprocesses and a
    sweep trial with one CPU run)."""
    done: dict[tuple[str, bool], Path] = {}

    def get(strategy: str, warm: bool) -> Path:
        if (strategy, warm) not in done:
            argv = ["run", *SMALL, "--strategy", strategy, "--out", "x", *(["--warm-start"] if warm else [])]
            cfg = config_from_args(build_parser().parse_args(argv))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                done[strategy, warm] = run_experiment(cfg, tmp_path_factory.mktemp("ref") / f"{strategy}-{warm}")
            finally:
                torch.set_num_threads(threads)
        return done[strategy, warm]

    return get


def test_every_phase_is_a_fault_point():
    """The chains cover every named phase, and the recipe calls each one (else a kill never fires)."""
    recipe = (ROOT / "fm_ray" / "run" / "recipe.py").read_text()
    assert {f.split(":")[0] for _, kills in CHAINS.values() for f in kills} == set(PHASES)
    assert all(recipe.count(f'fault_point("{p}", r)') == 1 for p in PHASES)


@pytest.mark.parametrize("chain", CHAINS)
def test_killed_runs_resume_to_the_uninterrupted_results(chain, reference, tmp_path):
    warm, kills = CHAINS[chain]
    ref = reference("entropy", warm)
    ref_rows, ref_queries = strip(read(ref, "rounds.parquet")), strip(read(ref, "queries.parquet"))
    out = tmp_path / chain
    argv = ["run", *SMALL, "--out", str(out), *(["--warm-start"] if warm else [])]
    survivors: dict[int, float] = {}  # round -> train_seconds of rows finished before a kill: never redone
    for i, fault in enumerate(kills):
        proc = fm_ray(argv + (["--resume"] if i else []), fault)
        assert proc.returncode == KILLED, (fault, proc.returncode, proc.stderr[-2000:])
        rows = read(out, "rounds.parquet")
        assert strip(rows) == ref_rows[: len(rows)], fault  # never a wrong row, whatever the phase
        phase, r = fault.split(":")
        if warm and phase == "rows_written":  # the round's weights never landed: it is redone
            assert not (out / f"checkpoint-r{r}.pt").exists() and rows[-1]["round"] == int(r)
            rows = rows[:-1]
            survivors.pop(int(r), None)
        survivors = {row["round"]: row["train_seconds"] for row in rows} | survivors
    proc = fm_ray(argv + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read(out, "rounds.parquet")
    assert strip(rows) == ref_rows and len(rows) == 3
    assert strip(read(out, "queries.parquet")) == ref_queries and len(ref_queries) == 20
    assert survivors and {r: rows[r]["train_seconds"] for r in survivors} == survivors
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint-r2.pt"]  # only the latest is kept


# ---------------------------------------------------------------------------------------------
# A sweep: SIGKILL the whole `fm-ray sweep` process group (driver, Ray, trial workers) mid-way.

SWEEP = [*SMALL, "--strategies", "entropy,random", "--max-concurrent", "1"]  # seed 3, as the references


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the sweep's session (it was started with its own), by pid."""
    sid = proc.pid
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=60)


@pytest.mark.ray
def test_killed_sweep_resumes_to_the_uninterrupted_rows(reference, tmp_path):
    """The uninterrupted rows: a trial computes what `fm-ray run` with the same flags computes
    (tests/test_sweep.py::test_trial_rows_equal_a_direct_run), so the references serve here too."""
    import pandas as pd

    from fm_ray.sweep.report import load_queries, load_rounds

    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "fm_ray.cli", "sweep", "--out", str(cut), *SWEEP]
    proc = subprocess.Popen(
        cmd, env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 900  # waits on a state (a published round); the ceiling stops a hang
        first = cut / "results" / "rounds"
        while not list(first.rglob("*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the first trial published a round: kill mid-way
    finally:
        _kill_group(proc)
    before = load_rounds(cut)
    assert 0 < len(before) < 6, len(before)
    resumed = fm_ray(["sweep", "--out", str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def rows(df) -> list[dict]:
        df = df.drop(columns=[c for c in TIMING_COLUMNS if c in df.columns])
        keys = [c for c in ("run_id", "round", "pool_index") if c in df.columns]
        return [{k: plain(v) for k, v in r.items()} for r in df.sort_values(keys).to_dict("records")]

    def plain(v):  # list cells come back as numpy arrays, missing numbers as NaN
        v = v.tolist() if hasattr(v, "tolist") else v
        return None if isinstance(v, float) and math.isnan(v) else v

    refs = [reference("entropy", False), reference("random", False)]
    assert rows(load_rounds(cut)) == rows(pd.concat([load_rounds(r) for r in refs])) and len(load_rounds(cut)) == 6
    ref_queries = pd.concat([load_queries(r) for r in refs])  # a run's queries lack the partition columns
    assert rows(load_queries(cut)[list(ref_queries.columns)]) == rows(ref_queries) and len(ref_queries) == 40
