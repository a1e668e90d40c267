"""`fm-ray run --driver-cpus/--driver-gpus`: the recipe in a Ray task gives the same rows and queries
as an in-process run, streams its progress lines, reports bad input as one line (exit 2), and
Ctrl+C stops it keeping the finished rounds, from which --resume completes the same run."""

from __future__ import annotations

import time

import pyarrow.parquet as pq
import pytest
import ray
import torch

from fm_ray.cli import build_parser, config_from_args, main
from fm_ray.errors import UserError
from fm_ray.run.remote import _beside_driver, run_remote
from fm_ray.run.rundir import TIMING_COLUMNS, run_id

pytestmark = pytest.mark.ray
# A tiny real run: FashionMNIST, 3 classes (420 pool images), CNN, 1 epoch, FisherMask (the d x d
# reduce included), 2 query rounds, the pool in-process (2 shards) so that only the driver is remote.
RUN = "run --dataset fashion_mnist --class-counts 0:60,1:300,2:60 --model cnn --strategy fishermask --init 20"
RUN += " --batch 10 --rounds 2 --epochs 1 --seed 3 --device cpu --backend local --shards 2"
ARGS = RUN.split()


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def results(out) -> tuple[list[dict], list[dict]]:
    rows = pq.read_table(out / "rounds.parquet").to_pylist()
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows], pq.read_table(
        out / "queries.parquet"
    ).to_pylist()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The reference: the same run without the flags, with the task's torch thread count (1)."""
    out = tmp_path_factory.mktemp("in_process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*ARGS, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return results(out)


def test_driver_flags_are_not_part_of_run_id():
    plain = config_from_args(build_parser().parse_args([*ARGS, "--out", "x"]))
    moved = config_from_args(
        build_parser().parse_args([*ARGS, "--out", "x", "--driver-cpus", "2", "--driver-gpus", "1"])
    )
    assert (moved.pool.driver_cpus, moved.pool.driver_gpus) == (2.0, 1.0) and plain.pool.driver_cpus is None
    assert run_id(moved) == run_id(plain)


def test_run_in_a_driver_task_gives_the_same_rows_and_streams_progress(in_process, tmp_path, capsys):
    out = tmp_path / "remote"
    assert main([*ARGS, "--out", str(out), "--driver-cpus", "1"]) == 0
    rows, queries = results(out)
    assert len(rows) == 3 and len(queries) == 20
    assert (rows, queries) == in_process
    lines = capsys.readouterr().out.splitlines()
    for r in range(3):  # each round's line, printed here although the round ran in the task
        assert any(f"round {r}/2 done" in line for line in lines), lines
    names = {"config.json", "rounds.parquet", "queries.parquet", "stop_preds.npy", "checkpoint-r2.pt"}
    assert {p.name for p in out.iterdir()} == names


def test_bad_input_found_in_the_task_is_the_same_one_line_and_exit_2(tmp_path, capsys):
    # missing data is only found where the data is loaded, i.e. inside the task
    argv = [*ARGS, "--data-dir", str(tmp_path / "no-data")]
    assert main([*argv, "--out", str(tmp_path / "here")]) == 2
    in_process = capsys.readouterr().err.splitlines()
    assert main([*argv, "--out", str(tmp_path / "there"), "--driver-cpus", "1"]) == 2
    remote = capsys.readouterr().err.splitlines()
    assert len(remote) == 1 and remote[0].startswith("fm-ray: error: dataset fashion_mnist not found under")
    assert remote == in_process


def test_shards_share_only_the_gpus_the_driver_leaves(tmp_path):
    parse = lambda *flags: config_from_args(build_parser().parse_args([*ARGS, "--out", "x", *flags]))
    gpus = ray.cluster_resources().get("GPU", 0.0)
    shared = _beside_driver(parse("--backend", "ray", "--shards", "2"), driver_gpus=min(gpus, 1.0))
    assert shared.pool.gpus_per_shard == min(1.0, (gpus - min(gpus, 1.0)) / 2)
    assert _beside_driver(parse("--backend", "ray", "--gpus-per-shard", "0.5"), 1.0).pool.gpus_per_shard == 0.5
    assert _beside_driver(parse(), 1.0).pool.gpus_per_shard is None  # the local pool asks Ray for nothing


def test_a_driver_bigger_than_the_cluster_fails_at_once(tmp_path):
    cfg = config_from_args(build_parser().parse_args([*ARGS, "--out", "x", "--driver-gpus", "1"]))
    with pytest.raises(UserError, match=r"cannot host the driver: needs \{'GPU': 1.0\}"):
        run_remote(cfg, tmp_path / "gpu")


def _wait_free_cpus(total: float) -> None:
    """Wait on a state (the cluster's CPUs all free again), not a time: the ceiling only stops a
    hang, so a slow, busy machine passes and a task that was never stopped still fails."""
    for _ in range(3000):  # 10 minutes of polls
        if ray.available_resources().get("CPU", 0.0) >= total:
            return
        time.sleep(0.2)
    raise AssertionError(f"the driver task still holds CPUs: {ray.available_resources()}")


def test_ctrl_c_stops_the_task_keeps_finished_rounds_and_resume_completes_the_run(in_process, tmp_path):
    """Ctrl+C arrives once round 0 is in --out (a state, not a log line's arrival or a time): the
    task is stopped before round 1 reaches --out, whatever the machine's speed."""
    out = tmp_path / "interrupted"
    cfg = config_from_args(build_parser().parse_args([*ARGS, "--out", str(out), "--driver-cpus", "1"]))

    def ctrl_c_after_round_0(row: dict) -> None:
        assert row["round"] == 0 and results(out)[0][-1]["round"] == 0  # round 0 is on disk here
        raise KeyboardInterrupt  # what Python's SIGINT handler raises in the main thread

    with pytest.raises(KeyboardInterrupt):
        run_remote(cfg, out, on_round=ctrl_c_after_round_0)
    _wait_free_cpus(2.0)  # the driver task is gone (run_remote waited for its end; Ray frees its CPUs)
    rows, queries = results(out)
    assert [r["round"] for r in rows] == [0]  # what finished before Ctrl+C is in --out
    assert (rows, queries) == (in_process[0][:1], [q for q in in_process[1] if q["round"] <= 1])

    assert main([*ARGS, "--out", str(out), "--driver-cpus", "1", "--resume"]) == 0
    assert results(out) == in_process


def test_ctrl_c_in_the_cli_is_exit_130_with_the_resume_hint(tmp_path, capsys, monkeypatch):
    import fm_ray.run.remote as remote

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(remote, "run_remote", interrupted)
    assert main([*ARGS, "--out", str(tmp_path / "o"), "--driver-cpus", "1"]) == 130
    assert "continue with --resume" in capsys.readouterr().err
