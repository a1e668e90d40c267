"""`write_bytes_atomically`, the one atomic write on pyarrow filesystems (pool files, sweep results):
two writers of one path leave one whole file, and object stores get one direct PUT (no rename)."""

import os
import threading
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest

import fm_ray._internal.files as files
from fm_ray._internal.files import write_bytes_atomically
from fm_ray.sweep import tune

A, B = b"a" * 3_000_000, b"b" * 2_000_000  # different lengths: a mix of the two is never one of them


class _Recording(pafs.FSSpecHandler):
    """A pyarrow filesystem over fsspec's, recording calls; `pause_move` holds the first move until set."""

    def __init__(self, fs, type_name="fsspec+file"):
        super().__init__(fs)
        self.type_name, self.calls = type_name, []
        self.first_move_reached, self.pause_move = threading.Event(), None

    def get_type_name(self):
        return self.type_name

    def open_output_stream(self, path, metadata):
        self.calls.append(("open_output_stream", path))
        return super().open_output_stream(path, metadata)

    def move(self, src, dest):
        self.calls.append(("move", src, dest))
        if self.pause_move is not None and not self.first_move_reached.is_set():
            self.first_move_reached.set()
            self.pause_move.wait(timeout=60)
        return super().move(src, dest)


def _writer(target, *args):
    errors = []

    def run():
        try:
            target(*args)
        except Exception as e:  # noqa: BLE001 - the test reports what the writer raised
            errors.append(e)

    return threading.Thread(target=run), errors


def test_a_writer_overtaken_between_write_and_rename_leaves_one_whole_file(tmp_path):
    """Writer A has written its temporary and waits to rename it; writer B writes the same path whole;
    then A renames. A shared temporary name (the sweep's old fixed `.tmp`) loses A's file or fails."""
    handler = _Recording(fsspec.filesystem("file"))
    handler.pause_move = threading.Event()
    fs = pafs.PyFileSystem(handler)
    path = f"{tmp_path}/results/x.parquet"
    a, a_errors = _writer(write_bytes_atomically, fs, path, A)
    a.start()
    assert handler.first_move_reached.wait(timeout=60)  # A holds its temporary, not yet renamed
    write_bytes_atomically(fs, path, B)
    assert Path(path).read_bytes() == B
    handler.pause_move.set()
    a.join()
    assert a_errors == [] and Path(path).read_bytes() == A  # the later rename wins, whole
    assert sorted(os.listdir(tmp_path / "results")) == ["x.parquet"]  # no temporary left


def test_local_writer_overtaken_before_its_rename(tmp_path, monkeypatch):
    """The same on a local path (mkstemp + fsync + os.replace)."""
    reached, go = threading.Event(), threading.Event()
    replace = os.replace

    def paused_replace(src, dst):
        if threading.current_thread() is not threading.main_thread() and not reached.is_set():
            reached.set()
            go.wait(timeout=60)
        return replace(src, dst)

    monkeypatch.setattr(files.os, "replace", paused_replace)
    fs, path = pafs.LocalFileSystem(), f"{tmp_path}/pool/pool.json"
    a, a_errors = _writer(write_bytes_atomically, fs, path, A)
    a.start()
    assert reached.wait(timeout=60)
    write_bytes_atomically(fs, path, B)
    assert Path(path).read_bytes() == B
    go.set()
    a.join()
    assert a_errors == [] and Path(path).read_bytes() == A
    assert os.listdir(tmp_path / "pool") == ["pool.json"]


def test_two_sweep_writers_racing_to_one_path_leave_one_whole_file(tmp_path):
    """`fm_ray.sweep.tune._write_bytes` (its fixed `.tmp` name collided) from two threads at once."""
    root = str(tmp_path)
    threads = [
        _writer(lambda d: [tune._write_bytes(root, "results/configs/r.json", d) for _ in range(40)], d) for d in (A, B)
    ]
    for t, _ in threads:
        t.start()
    for t, _ in threads:
        t.join()
    assert [e for _, errors in threads for e in errors] == []
    assert (tmp_path / "results" / "configs" / "r.json").read_bytes() in (A, B)
    assert os.listdir(tmp_path / "results" / "configs") == ["r.json"]


@pytest.mark.parametrize("type_name", ["fsspec+s3", "fsspec+('gcs', 'gs')"])
def test_object_stores_get_one_direct_put(type_name):
    """No rename there (pyarrow's move on S3/GCS is a copy and a delete): the object is written once, in place."""
    handler = _Recording(fsspec.filesystem("memory"), type_name)
    fs = pafs.PyFileSystem(handler)
    write_bytes_atomically(fs, "/bucket/pool/pool.json", b"{}")
    assert [c for c in handler.calls if c[0] in ("open_output_stream", "move")] == [
        ("open_output_stream", "/bucket/pool/pool.json")
    ]
    with fs.open_input_stream("/bucket/pool/pool.json") as f:
        assert f.read() == b"{}"


def test_pyarrow_object_store_names_are_recognised():
    class Named:
        def __init__(self, type_name):
            self.type_name = type_name

    assert [files._renames(Named(n)) for n in ("s3", "gcs", "abfs", "local", "mock", "py::fsspec+file")] == [
        False,
        False,
        False,
        True,
        True,
        True,
    ]
