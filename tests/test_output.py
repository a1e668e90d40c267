"""fm_ray's output (issue 17): the Python API prints nothing unless the caller configures logging;
the CLI shows INFO lines (-q/-v change that), per-epoch progress and a round line with train, eval
and query times."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fm_ray._internal import log as flog
from fm_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
SELECT = textwrap.dedent(
    """
    import logging, sys
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    import fm_ray

    if sys.argv[1] == "configured":
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    g = torch.Generator().manual_seed(0)
    pool = TensorDataset(torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    sel = fm_ray.select(model, pool, 5, labeled={0: 0, 1: 1}, strategy="fishermask", device="cpu", sparsity=0.05)
    assert len(sel.ids) == 5
    """
)


def run_select(mode: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", SELECT, mode], env=env, capture_output=True, text=True, timeout=300)


def test_the_python_api_prints_nothing_unless_logging_is_configured():
    quiet = run_select("default")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and "[fm-ray" not in quiet.stderr, (quiet.stdout, quiet.stderr)
    told = run_select("configured")
    assert told.returncode == 0, told.stderr
    assert "fm_ray: " in told.stdout and "Fisher mask" in told.stdout, told.stdout  # the caller's own format


@pytest.mark.parametrize(
    "verbose, quiet, level",
    [(0, 0, logging.INFO), (1, 0, logging.DEBUG), (0, 1, logging.WARNING), (0, 2, logging.ERROR), (3, 0, 10)],
)
def test_cli_level(verbose, quiet, level):
    assert flog.cli_level(verbose, quiet) == level


RUN = ["run", "--class-counts", "0:40,1:40", "--init", "10", "--batch", "5", "--rounds", "1", "--epochs", "5"]
RUN += ["--model", "mlp", "--device", "cpu", "--seed", "1"]


def test_cli_run_shows_epochs_and_a_round_line_with_train_eval_and_query_times(tmp_path, capsys):
    assert main([*RUN, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(line.startswith("[fm-ray ") for line in out), out
    # not a terminal: a line every few epochs (5 epochs: every one), each with loss and accuracy
    rows = pq.read_table(tmp_path / "a" / "rounds.parquet").to_pylist()
    epochs = [line for line in out if "round 0/1: epoch" in line]
    ran = rows[0]["train_epochs"]  # 5, or fewer if the training accuracy reached 0.99 first
    assert [line.split("epoch ")[1].split(",")[0] for line in epochs] == [f"{e}/5" for e in range(1, ran + 1)], out
    assert all("loss " in line and "train acc " in line for line in epochs)
    done = next(line for line in out if "round 0/1 done" in line)
    assert " train " in done and " eval " in done and " query " in done, done
    assert rows[0]["backend"] == "local"  # --backend auto, one shard, no cluster: in-process, recorded


def test_cli_quiet_prints_no_progress_and_errors_stay_one_line(tmp_path, capsys):
    assert main(["-q", *RUN, "--out", str(tmp_path / "q")]) == 0
    assert capsys.readouterr().out == ""
    assert main([*RUN, "-q", "--out", str(tmp_path / "q")]) == 2  # -q after the command too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0], err
