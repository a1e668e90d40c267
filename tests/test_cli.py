"""Bad input: one line naming the problem and the fix, exit code 2, no traceback."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fm_ray.cli import main

BASE = ["run", "--dataset", "fashion_mnist", "--model", "cnn", "--epochs", "1", "--rounds", "1"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "mnist_typo"], "unknown dataset 'mnist_typo'"),
        (["--setting", "setting9"], "unknown setting 'setting9'"),
        (["--strategy", "oracle"], "unknown strategy 'oracle'"),
        (["--model", "vgg"], "unknown model 'vgg'"),
        (["--preset", "s3"], "unknown preset 's3'"),
        (["--budget", "999999"], "--budget 999999 is beyond the pool"),
        (["--init", "8000"], "--init 8000 is beyond the pool"),
        (["--batch", "0"], "--batch must be positive"),
        (["--rounds", "-1"], "--rounds must be positive"),
        (["--init", "0"], "--init must be positive"),
        (["--class-counts", "0:7000"], "class 0 of fashion_mnist has 6000 train samples, 7000 asked"),
        (["--class-counts", "0:x"], "--class-counts '0:x' is not valid"),
        (["--data-dir", "/nonexistent/data"], "dataset fashion_mnist not found under /nonexistent/data"),
        (["--epochs", "abc"], "invalid int value: 'abc'"),
        (["--fisher-dtype", "float16"], "invalid choice: 'float16'"),
        (["--gpus-per-shard", "-1"], "--gpus-per-shard must be >= 0"),
        # every numeric option is checked up front, not after a round (issue 11, item 5)
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--train-batch-size", "0"], "--train-batch-size must be positive"),
        (["--backward-steps", "-1"], "--backward-steps must be >= 0"),
        (["--target-train-acc", "1.5"], "--target-train-acc must be in (0, 1]"),
        (["--target-train-acc", "0"], "--target-train-acc must be in (0, 1]"),
        (["--lam", "0"], "--lam must be a positive number"),
        (["--lam", "inf"], "--lam must be a positive number"),
        (["--sparsity", "nan"], "--sparsity must be in (0, 1]"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--cpus-per-shard", "nan"], "--cpus-per-shard must be positive"),
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    code = main([*BASE, "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert not (tmp_path / "run" / "rounds.parquet").exists()


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fm_ray.cli", *BASE, "--strategy", "nope", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fm-ray: error: unknown strategy 'nope': choose one of")


def test_existing_run_dir_refuses_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main([*BASE, "--out", str(out)]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--setting",
        "--class-counts",
        "--preset",
        "--model",
        "--strategy",
        "--init",
        "--batch",
        "--rounds",
        "--budget",
        "--epochs",
        "--seed",
        "--shards",
        "--device",
        "--data-dir",
        "--out",
        "--resume",
        "--overwrite",
        "--sparsity",
        "--fisher-samples",
        "--lam",
        "--backward-steps",
        "--labeled-init",
    ):
        assert flag in text


def test_run_out_must_be_local(capsys):
    assert main([*BASE, "--out", "s3://bucket/run"]) == 2
    assert "fm-ray run writes to a local folder" in capsys.readouterr().err


def test_non_cli_options_are_validated_too():
    from fm_ray.config import RunConfig, StrategyConfig, validate
    from fm_ray.errors import UserError

    with pytest.raises(UserError, match="chunk_size must be positive, got 0"):
        validate(RunConfig(strategy=StrategyConfig(chunk_size=0)))


# ---------------------------------------------------------------------------------------------
# --out, --resume and --overwrite (issue 11, item 5): refused up front, one line, nothing lost.


def fake_run(out: Path) -> dict[str, bytes]:
    """A run directory as `fm-ray run BASE` leaves it (config.json for BASE's config + a rows file)."""
    from fm_ray.cli import build_parser, config_from_args
    from fm_ray.run.rundir import RunDir

    cfg = config_from_args(build_parser().parse_args([*BASE, "--out", str(out)]))
    RunDir(out).open(cfg, resume=False, overwrite=False)
    (out / "rounds.parquet").write_bytes(b"the previous run's rows")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: (t / "f").write_text("x") and t / "f", "is a file, not a folder"),
        (lambda t: (t / "f").write_text("x") and t / "f" / "run", "is a file, not a folder"),
        (lambda t: Path("/proc/fm_ray_no_such_dir/run"), "cannot write in /proc"),  # even for root
        (lambda t: t / "missing", "--resume: no run to continue"),
        (lambda t: (t / "empty").mkdir() or t / "empty", "--resume: no run to continue"),
    ],
)
def test_bad_out_is_refused_before_any_work(make, message, tmp_path, capsys):
    out = make(tmp_path)
    resume = ["--resume"] if "resume" in message else []
    # a bad --data-dir too: the --out check must come first, before the data is looked for
    assert main([*BASE, "--out", str(out), *resume, "--data-dir", str(tmp_path / "no_data")]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--backward-steps", "-1"], "--backward-steps must be >= 0"),  # found only after a round before
        (["--init", "8000"], "--init 8000 is beyond the pool"),  # a data-dependent check
        (["--strategy", "oracle"], "unknown strategy"),
    ],
)
def test_overwrite_keeps_the_old_run_until_the_new_config_passed(bad, message, tmp_path, capsys):
    out = tmp_path / "run"
    before = fake_run(out)
    assert main([*BASE, "--out", str(out), "--overwrite", *bad]) == 2
    assert message in one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("rounds.parquet", b"PAR1 torn", "rounds.parquet is damaged"),
        ("queries.parquet", b"not parquet", "queries.parquet is damaged"),
        ("config.json", b"[1, 2]", "config.json is missing or damaged"),
        ("config.json", b'{"run_id": ', "config.json is missing or damaged"),
    ],
)
def test_damaged_files_on_resume_are_one_line(name, content, message, tmp_path, capsys):
    from fm_ray.cli import build_parser, config_from_args
    from fm_ray.errors import UserError
    from fm_ray.run.rundir import RunDir

    out = tmp_path / "run"
    fake_run(out)
    (out / "rounds.parquet").unlink()
    (out / name).write_bytes(content)
    cfg = config_from_args(build_parser().parse_args([*BASE, "--out", str(out)]))
    with pytest.raises(UserError, match="use --overwrite") as e:
        RunDir(out).open(cfg, resume=True, overwrite=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert (out / name).read_bytes() == content  # a refused resume changes nothing


def test_inconsistent_results_on_resume_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fm_ray.cli import build_parser, config_from_args
    from fm_ray.errors import UserError
    from fm_ray.run.rundir import RunDir

    out = tmp_path / "run"
    fake_run(out)
    cfg = config_from_args(build_parser().parse_args([*BASE, "--out", str(out)]))
    pq.write_table(pa.table({"run_id": ["a"], "round": [0]}), out / "rounds.parquet")
    with pytest.raises(UserError, match="lacks column"):
        RunDir(out).open(cfg, resume=True, overwrite=False)
    pq.write_table(pa.table({"run_id": ["a", "a"], "round": [0, 2], "n_queried": [10, 10]}), out / "rounds.parquet")
    with pytest.raises(UserError, match="does not hold rounds 0, 1, ... in order"):
        RunDir(out).open(cfg, resume=True, overwrite=False)
    pq.write_table(pa.table({"run_id": ["a"], "round": [0], "n_queried": [10]}), out / "rounds.parquet")
    pq.write_table(pa.table({"round": [1] * 3, "pool_index": [1, 2, 3]}), out / "queries.parquet")
    with pytest.raises(UserError, match="holds 3 queries of round 0, its row says 10"):
        RunDir(out).open(cfg, resume=True, overwrite=False)


def test_warm_start_resume_redoes_a_round_whose_weights_never_landed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from fm_ray.cli import build_parser, config_from_args
    from fm_ray.errors import UserError
    from fm_ray.run.rundir import RunDir

    out = tmp_path / "run"
    cfg = config_from_args(build_parser().parse_args([*BASE, "--out", str(out), "--warm-start"]))
    run = RunDir(out)
    run.open(cfg, resume=False, overwrite=False)
    pq.write_table(pa.table({"run_id": ["a"] * 2, "round": [0, 1], "n_queried": [2, 2]}), run.rounds_path)
    pq.write_table(pa.table({"round": [1, 1, 2, 2], "pool_index": [5, 6, 7, 8]}), run.queries_path)
    with pytest.raises(UserError, match="lacks the warm-start weights of rounds 0 and later"):
        run.open(cfg, resume=True, overwrite=False)  # never silently train from other weights
    run.save_checkpoint({"w": torch.ones(1)}, 0)  # killed between round 1's row and its weights
    rows, queries = run.open(cfg, resume=True, overwrite=False)
    assert [r["round"] for r in rows] == [0] and [q["pool_index"] for q in queries] == [5, 6]
    run.save_checkpoint({"w": torch.ones(1)}, 1)
    rows, queries = run.open(cfg, resume=True, overwrite=False)
    assert [r["round"] for r in rows] == [0, 1] and len(queries) == 4


def test_checkpoints_load_weights_only(tmp_path):
    """A checkpoint holding arbitrary pickled objects is refused (torch.load weights_only=True)."""
    import torch

    from fm_ray.errors import UserError
    from fm_ray.run.rundir import RunDir

    run = RunDir(tmp_path)
    run.save_checkpoint({"w": torch.ones(2)}, 0)
    assert torch.equal(run.load_checkpoint(0)["w"], torch.ones(2))
    run.save_checkpoint({"w": torch.zeros(2)}, 1)
    assert [p.name for p in run.checkpoints()] == ["checkpoint-r1.pt"]  # older ones go once the new one landed
    torch.save({"w": Path("x")}, run.checkpoint_path(2))  # not a tensor: unpickling it would run code
    with pytest.raises(UserError, match="checkpoint-r2.pt is unreadable"):
        run.load_checkpoint(2)


# ---------------------------------------------------------------------------------------------
# Paths from user text (issue 11, item 6): no setting, dataset or strategy name leaves --out.

HOSTILE = ["../../evil", "/etc/passwd", "a/b", "..", ".hidden", "x y\tz", "ü\x00"]


@pytest.mark.parametrize("name", HOSTILE)
def test_run_ids_and_sweep_paths_stay_inside_out(name, tmp_path):
    import dataclasses

    from fm_ray.cli import build_parser, config_from_args
    from fm_ray.run.rundir import run_id
    from fm_ray.sweep.tune import local_run_dir, partition_dir

    argv = [*BASE, "--out", "o", "--class-counts", "0:40,1:60", "--setting", name, "--strategy", name]
    cfg = config_from_args(build_parser().parse_args(argv))
    folder = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataset=f"imagefolder:/x/{name}/.."))
    root = tmp_path / "sweep"
    for c in (cfg, folder):
        rid = run_id(c)
        assert re.fullmatch(r"[A-Za-z0-9_=-][A-Za-z0-9_.=-]*", rid), rid
        for path in (
            local_run_dir(str(root), rid),  # the trial's run dir
            root / "results" / "rounds" / partition_dir(c) / f"{rid}.parquet",
            root / "results" / "configs" / f"{rid}.json",
            root / "tune" / rid,  # Tune's trial dir (trial_dirname_creator)
        ):
            assert path.resolve().is_relative_to(root.resolve()) and ".." not in path.parts, path
    plain = config_from_args(build_parser().parse_args([*BASE, "--out", "o", "--class-counts", "0:40,1:60"]))
    assert run_id(cfg) != run_id(plain)  # sanitizing keeps ids distinct (the digest covers the raw names)
