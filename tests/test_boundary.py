"""One error boundary (issue 21): `fm-ray` and `fm_ray.select` end every failure in one line and a code.

Bad input: exit 2; the environment (disk full, permissions, the Ray cluster): exit 1 naming the path
and the fix; Ctrl+C / SIGTERM: 130 / 143 with the command's resume line; anything else: one line
naming a log file that holds the traceback, argv and versions, exit 1.
"""

import errno
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import fm_ray
import fm_ray.cli as cli
from fm_ray._internal.ray_session import reachable_or_die
from fm_ray.cli import main
from fm_ray.errors import UserError

RUN = ["run", "--dataset", "fashion_mnist", "--model", "cnn", "--epochs", "1", "--rounds", "1"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FM_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FM_RAY_DEBUG", raising=False)
    return tmp_path / "cache"


def fail_with(monkeypatch, command: str, exc: BaseException) -> None:
    """`fm-ray <command>` raises `exc` from its body (the parser still runs as it does)."""

    def body(args):
        raise exc

    monkeypatch.setattr(cli, f"_{command}", body)


# -- the ladder ---------------------------------------------------------------------------------
def test_an_internal_error_is_one_line_naming_a_log_with_traceback_argv_and_versions(cache, monkeypatch, capsys):
    fail_with(monkeypatch, "strategies", ZeroDivisionError("boom " * 60 + "\nsecond line"))
    assert main(["strategies"]) == 1
    err = one_line(capsys)
    assert err.startswith("fm-ray: internal error (ZeroDivisionError: boom boom") and "second line" not in err
    assert len(err.split(" (", 1)[1].split("), details")[0]) <= 120  # the message cut to 120 characters
    log = err.rsplit("details in ", 1)[1]
    assert log.startswith(str(cache / "errors"))
    text = Path(log).read_text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "argv: ['strategies']" in text
    assert all(f"{name} " in text for name in ("Python", "fm_ray", "torch", "ray"))


def test_verbose_prints_the_traceback_and_fm_ray_debug_raises_it(cache, monkeypatch, capsys):
    fail_with(monkeypatch, "strategies", KeyError("missing"))
    assert main(["-v", "strategies"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("fm-ray: internal error (KeyError")
    monkeypatch.setenv("FM_RAY_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["strategies"])


def test_an_internal_error_logs_into_the_project_folder(cache, project, monkeypatch, capsys):
    from fm_ray.project.project import Project

    def broken(self):
        raise RuntimeError("status broke")

    monkeypatch.setattr(Project, "status", broken)
    assert main(["project", "status", str(project)]) == 1
    log = one_line(capsys).rsplit("details in ", 1)[1]
    assert os.path.dirname(log) == str(project) and "status broke" in Path(log).read_text()


@pytest.mark.parametrize(
    "exc, words",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/run/rounds.parquet"),
            ["/data/run/rounds.parquet", "free space"],
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/srv/pool"), ["/srv/pool", "access"]),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"), ["/mnt/ro/x", "read-only"]),
        (
            OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),
            ["No space left", "free space"],
        ),
        (ConnectionError("Could not find any running Ray instance"), ["Ray cluster", "ray status"]),
    ],
)
def test_environment_failures_are_one_line_exit_1_naming_the_path_and_the_fix(exc, words, cache, monkeypatch, capsys):
    fail_with(monkeypatch, "strategies", exc)
    assert main(["strategies"]) == 1
    err = one_line(capsys)
    assert err.startswith("fm-ray: error: ") and all(w in err for w in words), err
    assert not (cache / "errors").exists()  # expected: no internal-error log


def test_sigterm_is_143_and_ctrl_c_130_with_the_commands_resume_line(cache, tmp_path, monkeypatch, capsys):
    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises here, in the main thread
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(cli, "_run", terminated)
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or Ray's where an earlier test started Ray here
    assert main([*RUN, "--out", str(tmp_path / "r")]) == 143
    assert "continue with --resume" in one_line(capsys)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    fail_with(monkeypatch, "run", SystemExit(signal.SIGTERM))  # what Ray's driver handler raises
    assert main([*RUN, "--out", str(tmp_path / "r")]) == 143
    assert "continue with --resume" in one_line(capsys)
    fail_with(monkeypatch, "sweep", KeyboardInterrupt())
    assert main(["sweep", "--out", str(tmp_path / "s"), "--strategies", "random"]) == 130
    assert f"fm-ray sweep --out {tmp_path / 's'} --resume" in one_line(capsys)


def test_the_api_raises_internal_error_with_the_cause(cache):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):  # fine on the one probe input, broken on a block of the pool
            if len(x) > 1:
                raise ZeroDivisionError("broken on batches")
            return self.fc(x)

    with pytest.raises(fm_ray.InternalError) as e:
        fm_ray.select(Broken(), torch.rand(50, 4), k=3, strategy="entropy")
    assert e.value.__suppress_context__ and isinstance(e.value.cause, ZeroDivisionError)
    assert str(e.value).startswith("fm_ray: internal error (ZeroDivisionError: broken on batches), details in ")
    assert "Traceback" in Path(e.value.log).read_text()


# -- the cases the issue lists ------------------------------------------------------------------
@pytest.fixture
def project(cache, tiny_project):
    return tiny_project


@pytest.mark.parametrize("sub", ["", "sub"])
def test_pack_into_a_file_is_one_line(sub, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / sub if sub else tmp_path / "afile"
    assert main(["pack", f"folder:{tmp_path}", str(out)]) == 2
    assert "is a file, not a folder: give a folder path for OUT" in one_line(capsys)


def test_project_init_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["project", "init", str(tmp_path / "afile"), "--pool", "fashion_mnist", "--classes", "a,b"]) == 2
    assert "is a file, not a folder" in one_line(capsys)


def test_disk_full_during_an_import_is_one_line_and_keeps_the_labels(
    project, tmp_path, labels_csv, monkeypatch, capsys
):
    assert main(["project", "import", str(project), str(labels_csv("a.csv", [("0.png", "cat")]))]) == 0
    before = (project / "labels.csv").read_bytes()
    capsys.readouterr()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fm_ray._internal.files.os.fsync", full)
    assert main(["project", "import", str(project), str(labels_csv("b.csv", [("1.png", "dog")]))]) == 1
    err = one_line(capsys)
    assert f"No space left on device: {project / 'labels.csv'}: free space" in err
    assert (project / "labels.csv").read_bytes() == before
    assert [p.name for p in project.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    "rows, words",
    [
        ([("0.png", "cow", "")], ["line 2: unknown class 'cow' for id '0.png'", "cat, dog"]),
        (
            [("0.png", "cat", ""), ("1.png", "dog", ""), ("0.png", "dog", "")],
            ["lines 2 and 4 give id '0.png' two classes"],
        ),
        ([("0.png", "", "")], ["line 2: expected id,label,batch"]),
    ],
)
def test_a_hand_edited_labels_csv_is_one_line_in_every_command(rows, words, project, capsys):
    text = "id,label,batch\n" + "".join(",".join(r) + "\n" for r in rows)
    (project / "labels.csv").write_text(text)
    capsys.readouterr()
    for command in (["next", str(project), "--k", "2"], ["status", str(project)], ["import", str(project), "x"]):
        (project.parent / "x").write_text("id,label\n2.png,cat\n")
        assert main(["project", *command]) == 2, command
        err = one_line(capsys)
        assert all(w in err for w in words), err
    assert (project / "labels.csv").read_text() == text


def test_identical_repeated_labels_csv_rows_are_one_label(project, capsys):
    (project / "labels.csv").write_text("id,label,batch\n0.png,cat,\n0.png,cat,\n1.png,dog,\n")
    assert main(["project", "status", str(project)]) == 0
    assert "labels: 2 " in capsys.readouterr().out


def test_a_csv_cell_over_the_csv_limit_is_one_line(project, tmp_path, capsys):
    big = tmp_path / "big.csv"
    big.write_text("id,label\n0.png,cat\n1.png," + "d" * 140_000 + "\n")
    assert main(["project", "import", str(project), str(big)]) == 2
    assert f"{big} line 3: not a CSV line (field larger than field limit" in one_line(capsys)
    source = tmp_path / "imgs" / "list.csv"
    source.write_text("path,label\n0.png,a\n1.png," + "b" * 140_000 + "\n")
    assert main(["pack", f"csv:{source}", str(tmp_path / "pool")]) == 2
    assert "line 3: not a CSV line" in one_line(capsys)
    (project / "labels.csv").write_text("id,label,batch\n0.png," + "c" * 140_000 + ",\n")
    assert main(["project", "status", str(project)]) == 2
    assert "labels.csv line 2: not a CSV line" in one_line(capsys)


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, '{"a":' * 200_000 + "1" + "}" * 200_000])
def test_a_deeply_nested_json_export_is_one_line(text, project, tmp_path, capsys):
    export = tmp_path / "export.json"
    export.write_text(text)
    assert main(["project", "import", str(project), str(export)]) == 2
    assert "nested too deeply to be a Label Studio export" in one_line(capsys)


def test_report_on_a_truncated_parquet_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.table({"run_id": ["a"] * 100, "round": list(range(100))}), run / "rounds.parquet")
    data = (run / "rounds.parquet").read_bytes()
    (run / "rounds.parquet").write_bytes(data[: len(data) // 2])
    assert main(["report", str(run)]) == 2
    err = one_line(capsys)
    assert "a results file is damaged or not Parquet" in err and "rounds.parquet" in err
    sweep = tmp_path / "sweep" / "results" / "rounds" / "dataset=d" / "setting=s"
    sweep.mkdir(parents=True)
    (sweep / "x.parquet").write_bytes(data[:100])
    assert main(["report", str(tmp_path / "sweep")]) == 2
    assert "x.parquet" in one_line(capsys)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_select_casts_a_model_of_another_dtype_to_float32(dtype):
    x = torch.rand(60, 1, 4, 4)
    expected = fm_ray.select(small_net(), x, k=4, labeled={0: 1}, strategy="bait", device="cpu").ids
    model = small_net().to(dtype)
    assert fm_ray.select(model, x, k=4, labeled={0: 1}, strategy="bait", device="cpu").ids == expected
    assert next(model.parameters()).dtype == dtype  # the caller's model is left as it was


class Pair(nn.Module):
    """A model that returns (logits, features): the README promises logits only."""

    def __init__(self):
        super().__init__()
        self.net = small_net()

    def forward(self, x):
        return self.net(x), x.flatten(1)


@pytest.mark.parametrize(
    "model, embed, error, words",
    [
        (Pair(), None, TypeError, "model must return a logits tensor (N, C), got a tuple"),
        (
            small_net(),
            lambda x: x.flatten(1).sum(1),
            ValueError,
            "embed must map 1 inputs to features (1, E), got (1,)",
        ),
        (small_net(), lambda x: x[:1].flatten(1), ValueError, "got (1, 16)"),
        (small_net(), lambda x: (x, x), ValueError, "got tuple"),
        (small_net(), lambda x: x.view(3, -1), ValueError, "the model (or embed=) fails on a batch of 1 pool input"),
    ],
)
def test_select_refuses_a_tuple_output_or_a_wrong_embed_in_one_line(model, embed, error, words):
    with pytest.raises(error) as e:
        fm_ray.select(model, torch.rand(300, 1, 4, 4), k=4, strategy="badge", embed=embed, device="cpu")
    assert isinstance(e.value, UserError) and words in str(e.value), str(e.value)


def test_version_as_a_string_in_pool_json_is_one_line(tmp_path):
    from fm_ray.data.parquet import FORMAT, VERSION, _read_manifest

    for version in (str(VERSION), None, True):
        text = json.dumps({"format": FORMAT, "version": version}).encode()
        with pytest.raises(UserError, match=f"version {version!r} is not a format number"):
            _read_manifest(str(tmp_path), text)


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n", b"SSH-2.0-OpenSSH_9.6\r\n"])
def test_a_ray_address_where_another_server_listens_fails_within_the_deadline(answer):
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        conns = []

        def serve():
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                conns.append(c)
                c.sendall(answer)

        threading.Thread(target=serve, daemon=True).start()
        start = time.monotonic()
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            with pytest.raises(UserError, match=f"127.0.0.1:{port} accepts connections but does not answer as a Ray"):
                reachable_or_die(address, wait_s=1.0)
        assert time.monotonic() - start < 20
        for c in conns:
            c.close()


def test_ray_cluster_failures_are_environment_failures():
    from ray.exceptions import LocalRayletDiedError, NodeDiedError, RaySystemError

    from fm_ray._internal.boundary import outcome

    for exc in (LocalRayletDiedError(), NodeDiedError("node 1 died"), RaySystemError("GCS unreachable")):
        out = outcome(exc)
        assert out.code == 1 and out.log is None and "the Ray cluster failed" in out.line, out


TINY_RAY_RUN = ["run", "--class-counts", "0:60,1:60,2:60", "--model", "cnn", "--epochs", "1", "--init", "10"]
TINY_RAY_RUN += ["--batch", "5", "--rounds", "40", "--backend", "ray", "--shards", "2", "--device", "cpu"]
TINY_RAY_RUN += ["--strategy", "entropy"]


@pytest.mark.slow
@pytest.mark.ray
def test_sigterm_to_a_ray_run_is_143_with_the_resume_line(tmp_path, fm_ray_until):
    """SIGTERM to `fm-ray` (the watcher, which forwards it) once round 0 is on disk (a state, not a
    time): Ray's own driver handler (sys.exit) or fm_ray's, the run ends 143 with the resume line and
    no traceback; --out keeps round 0."""
    out = tmp_path / "run"
    code, _, err = fm_ray_until(
        [*TINY_RAY_RUN, "--out", str(out)], (out / "rounds.parquet").exists, lambda p: p.send_signal(signal.SIGTERM)
    )
    assert code == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "fm-ray: interrupted; finished rounds are saved, continue with --resume"
    ), err
    assert pq.read_table(out / "rounds.parquet").num_rows >= 1


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, name) of every process under `pid`, from /proc."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(rest[1]), []).append((int(entry), name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_raylet_ends_a_run_in_one_line_keeping_its_rounds(tmp_path, fm_ray_until):
    """SIGKILL to the run's raylet once round 0 is on disk: Ray's core worker ends the driver with
    _Exit(1), where no Python runs; the `fm-ray` watcher gives the line, and the rounds stay."""
    out = tmp_path / "run"

    def kill_raylet(proc):
        raylets = [pid for pid, name in descendants(proc.pid) if name == "raylet"]
        assert len(raylets) == 1, descendants(proc.pid)
        os.kill(raylets[0], signal.SIGKILL)

    code, _, err = fm_ray_until([*TINY_RAY_RUN, "--out", str(out)], (out / "rounds.parquet").exists, kill_raylet)
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fm-ray: error: the process doing the work ended abruptly (exit code 1)"), err
    assert "a dead Ray raylet" in last and last.endswith("finished rounds are saved, continue with --resume"), last
    assert "Traceback" not in err
    assert pq.read_table(out / "rounds.parquet").num_rows >= 1
