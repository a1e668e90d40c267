"""Interrupted and duplicated sweeps (issue 21, family 6): Ctrl+C ends `fm-ray sweep` with 130 and
fm_ray's resume line (not Tune's Tuner.restore hint and exit 0); `fm-ray report` refuses a run
whose rows sit in two files, naming both."""

import shutil
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fm_ray.cli import main
from fm_ray.errors import UserError
from fm_ray.sweep.report import load_queries, load_rounds


def results(root, kind, files):
    """A sweep's results/<kind> folder: {relative path: run ids of its rows}."""
    for rel, rids in files.items():
        path = root / "results" / kind / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"run_id": rids, "round": list(range(len(rids)))}), path)
    return root


@pytest.mark.parametrize(
    "files, first, second",
    [
        # the example: a copy beside the sweep's own file
        (
            {"dataset=d/setting=s/r1.parquet": ["r1", "r1"], "dataset=d/setting=s/r1 (copy).parquet": ["r1"]},
            "r1 (copy).parquet",
            "r1.parquet",
        ),
        (
            {"dataset=d/setting=s/r1.parquet": ["r1"], "dataset=d/setting=t/r1.parquet": ["r1"]},
            "setting=s/r1.parquet",
            "setting=t/r1.parquet",
        ),
        (
            {"dataset=d/setting=s/r1.parquet": ["r1"], "dataset=d/setting=s/r2.parquet": ["r2", "r1"]},
            "r1.parquet",
            "r2.parquet",
        ),
    ],
)
def test_report_refuses_a_run_in_two_files_naming_both(files, first, second, tmp_path, capsys):
    root = results(tmp_path / "sweep", "rounds", files)
    assert main(["report", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run r1 has rows in two files" in err, err
    assert first in err and second in err
    results(root, "queries", files)
    with pytest.raises(UserError, match="run r1 has rows in two files"):
        load_queries(root)


def test_one_file_per_run_is_read(tmp_path):
    root = results(
        tmp_path / "sweep",
        "rounds",
        {"dataset=d/setting=s/r1.parquet": ["r1"], "dataset=d/setting=s/r2.parquet": ["r2"]},
    )
    assert sorted(load_rounds(root)["run_id"]) == ["r1", "r2"]


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_during_a_sweep_is_130_with_the_fm_ray_resume_line(tmp_path, fm_ray_until):
    """SIGINT to `fm-ray` (the watcher forwards it) once a first trial's rows are in --out (a state,
    not a time)."""
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--strategies", "random,entropy", "--seeds", "0,1,2"]
    argv += ["--class-counts", "0:60,1:60,2:60", "--init", "10", "--batch", "5", "--rounds", "30", "--epochs", "1"]
    argv += ["--model", "cnn", "--device", "cpu", "--backend", "local", "--cpus-per-trial", "1"]

    def published() -> bool:
        return (out / "results").exists() and bool(list((out / "results" / "rounds").rglob("*.parquet")))

    code, stdout, stderr = fm_ray_until(argv, published, lambda p: p.send_signal(signal.SIGINT))
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"fm-ray: interrupted; finished trials and rounds are saved, continue with `fm-ray sweep --out {out} --resume`"
    ), stderr
    assert "Tuner.restore" not in stdout + stderr and "Traceback" not in stderr
    shutil.rmtree(out, ignore_errors=True)
