"""Bad input: one line naming the problem and the fix, exit code 2, no traceback."""

import subprocess
import sys

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
