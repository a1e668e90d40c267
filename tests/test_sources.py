"""The one data layer: every spec opens through `open_source` to the same record, with one rule for
listing, decoding, normalization and where fm_ray may write; `fm-ray run`, `pack`, projects and
`fm_ray.select` see the same ids, labels and pixels for the same files."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fm_ray.cli import main
from fm_ray.data.core import STD_FLOOR, Dataset, channel_stats
from fm_ray.data.pack import pack
from fm_ray.data.registry import SOURCES, open_source
from fm_ray.errors import UserError

CIFAR = Path(os.environ["FM_RAY_DATA"]) / "CIFAR10-jpg"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FM_RAY_CACHE", str(tmp_path / "cache"))


def copy_jpgs(dest: Path, cifar_class: str, n: int, start: int = 0) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        src = CIFAR / "train" / cifar_class / f"{i:04d}.jpg"
        out.append(Path(shutil.copy(src, dest / src.name)))
    return out


def imagefolder(root: Path, n: int = 3) -> Path:
    for split, start in (("train", 0), ("test", 50)):
        for name, cls in (("cat", "cat"), ("dog", "dog")):
            copy_jpgs(root / split / name, cls, n, start)
    return root


def pil_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def test_every_registered_source_opens_to_one_record(tmp_path):
    """The registry is the one place a spec is dispatched; each kind opens to a `Dataset`."""
    root = imagefolder(tmp_path / "if")
    folder = tmp_path / "flat"
    copy_jpgs(folder / "a", "bird", 2)
    copy_jpgs(folder, "frog", 2)
    (tmp_path / "list.csv").write_text("path,label\nflat/a/0000.jpg,x\nflat/0000.jpg,y\nflat/0001.jpg,x\n")
    specs = {
        "fashion_mnist": "fashion_mnist",
        "cifar10": "cifar10",
        "imagefolder": f"imagefolder:{root}",
        "folder": f"folder:{folder}",
        "csv": f"csv:{tmp_path / 'list.csv'}",
    }
    assert set(specs) | {"parquet"} == set(SOURCES)
    for kind, spec in specs.items():
        data = open_source(spec)
        assert isinstance(data, Dataset), kind
        assert len(data.train.ids) == len(set(data.train.ids)) == len(data.train.images), kind
        x = data.train.images.read(np.array([0]))
        assert x.dtype == torch.uint8 and x.dim() == 4, kind
    folder_data = open_source(f"folder:{folder}")
    assert list(folder_data.train.ids) == ["0000.jpg", "0001.jpg", "a/0000.jpg", "a/0001.jpg"]
    assert folder_data.train.labels is None and folder_data.test is None
    csv_data = open_source(f"csv:{tmp_path / 'list.csv'}")
    assert csv_data.classes == ("x", "y") and csv_data.train.labels.tolist() == [0, 1, 0]
    # pixels are the files' own, decoded independently
    assert torch.equal(csv_data.train.images.read(np.array([1]))[0], pil_rgb(folder / "0000.jpg"))
    with pytest.raises(UserError, match="unknown dataset 'nope:x'"):
        open_source("nope:x")
    with pytest.raises(UserError, match="unknown dataset 'folder'"):
        open_source("folder")


def test_run_and_pack_list_an_image_folder_the_same_way(tmp_path, caplog):
    """Hidden folders are no class and hidden files no image, a non-image file is left out and named,
    in `fm-ray run` (open_source) and in `fm-ray pack` alike (before, pack took .ipynb_checkpoints as
    a class and run refused notes.txt)."""
    root = imagefolder(tmp_path / "if")
    for split in ("train", "test"):
        copy_jpgs(root / split / ".ipynb_checkpoints", "cat", 1)
        (root / split / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    data = open_source(f"imagefolder:{root}")
    assert data.classes == ("cat", "dog")
    packed = tmp_path / "packed"
    pack(f"imagefolder:{root}", str(packed))
    pooled = open_source(f"parquet:{packed}")
    assert pooled.classes == data.classes
    for split in ("train", "test"):
        a, b = getattr(data, split), getattr(pooled, split)
        assert list(a.ids) == list(b.ids)
        assert torch.equal(a.labels, b.labels)
        n = np.arange(len(a))
        assert torch.equal(a.images.read(n), b.images.read(n))
    assert not any("ipynb" in i or "notes" in i or "DS_Store" in i for i in data.train.ids)
    assert data.mean == pytest.approx(pooled.mean, abs=0) and data.std == pytest.approx(pooled.std, abs=0)


def test_csv_labels_are_checked(tmp_path, capsys):
    copy_jpgs(tmp_path / "img", "cat", 4)

    def write(rows: str) -> str:
        (tmp_path / "l.csv").write_text("path,label\n" + rows)
        return f"csv:{tmp_path / 'l.csv'}"

    data = open_source(write("img/0000.jpg,cat\nimg/0001.jpg,cat\nimg/0002.jpg,dog\n"))
    assert data.classes == ("cat", "dog") and data.train.labels.tolist() == [0, 0, 1]
    data = open_source(write("img/0000.jpg,2\nimg/0001.jpg,0\nimg/0002.jpg,1\n"))
    assert data.classes == ("0", "1", "2") and data.train.labels.tolist() == [2, 0, 1]
    for rows, problem in (
        ("img/0000.jpg,cat\nimg/0001.jpg,\n", "line 3: img/0001.jpg has an empty label"),
        ("img/0000.jpg,1\nimg/0001.jpg,-1\n", "line 3: label '-1' is not an integer label"),
        # `cat ` was stripped into `cat`; whitespace around a label is now an error naming the row (issue 21)
        ("img/0000.jpg,cat\nimg/0001.jpg,cat \n", "line 3: label 'cat ' has whitespace around it"),
    ):
        spec = write(rows)
        with pytest.raises(UserError, match=problem):
            open_source(spec)
        assert main(["pack", spec, str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert problem in err and len(err.splitlines()) == 1


def test_a_constant_channel_is_floored_not_divided_by_zero(tmp_path):
    """A folder whose blue channel is 0 everywhere: std 0 would make every input NaN."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                arr[..., 2] = 0
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    data = open_source(f"imagefolder:{tmp_path}")
    assert data.std[2] == STD_FLOOR and data.mean[2] == 0
    x = data.train.images.read(np.arange(len(data.train)))
    assert torch.isfinite(data.norm(x)).all()
    # the other channels: exact mean/std of pixels / 255, as the literal formula gives
    vals = x[:, 0].double().flatten() / 255
    assert data.mean[0] == pytest.approx(float(vals.mean()), rel=1e-12)
    assert data.std[0] == pytest.approx(float(vals.std()), rel=1e-9)


def test_channel_stats_are_exact_and_order_free():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (50, 3, 4, 4), dtype=np.uint8)
    mean, std = channel_stats(x)
    ref = torch.from_numpy(x).double().div(255).transpose(0, 1).reshape(3, -1)
    assert np.allclose(mean, ref.mean(1).numpy(), rtol=1e-13)
    assert np.allclose(std, ref.std(1).numpy(), rtol=1e-10)
    assert channel_stats(x[::-1].copy()) == (mean, std)


def test_out_inside_the_data_folder_is_refused(tmp_path, capsys):
    root = imagefolder(tmp_path / "if")
    out = root / "train" / "run"
    argv = ["run", "--dataset", f"imagefolder:{root}", "--class-counts", "0:3,1:3", "--init", "2", "--batch", "2"]
    assert main([*argv, "--rounds", "1", "--epochs", "1", "--backend", "local", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is inside the data folder" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["pack", f"imagefolder:{root}", str(root / "packed")]) == 2
    assert "is inside the data folder" in capsys.readouterr().err
    assert sorted(os.listdir(root / "train")) == ["cat", "dog"]


def test_project_dir_inside_the_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "imgs"
    copy_jpgs(folder, "cat", 3)
    assert main(["project", "init", str(folder / "proj"), "--pool", f"folder:{folder}", "--classes", "a,b"]) == 2
    assert "is inside the data folder" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == ["0000.jpg", "0001.jpg", "0002.jpg"]


def _no_nan(constant: str) -> float:
    raise ValueError(f"{constant} in tasks.json is not JSON")


def test_project_batch_from_a_constant_channel_folder_is_valid_json(tmp_path):
    """Before: std 0 -> NaN probabilities in batch.csv and `"score": NaN` in tasks.json."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(12):
        arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        arr[..., 1] = 7
        Image.fromarray(arr).save(folder / f"{i:02d}.png")
    proj = tmp_path / "proj"
    base = ["--model", "mlp", "--epochs", "1", "--backend", "local"]
    assert main(["project", "init", str(proj), "--pool", f"folder:{folder}", "--classes", "a,b", *base]) == 0
    assert main(["project", "next", str(proj), "--k", "4"]) == 0
    ids = [line.split(",")[0] for line in (proj / "batches" / "0" / "batch.csv").read_text().splitlines()[1:]]
    (tmp_path / "l.csv").write_text("id,label\n" + "".join(f"{i},{'ab'[n % 2]}\n" for n, i in enumerate(ids)))
    assert main(["project", "import", str(proj), str(tmp_path / "l.csv")]) == 0
    assert main(["project", "next", str(proj), "--k", "3"]) == 0
    tasks = json.loads((proj / "batches" / "1" / "tasks.json").read_text(), parse_constant=_no_nan)
    for task in tasks:
        for pred in task["predictions"]:
            assert math.isfinite(pred["score"])
    rows = (proj / "batches" / "1" / "batch.csv").read_text().splitlines()[1:]
    assert all("nan" not in r.lower() for r in rows)


def test_pack_once_then_label_a_packed_unlabeled_pool(tmp_path, capsys):
    """A packed folder (no test split, no labels) makes a project: before, `project init` refused it
    ("has no test split to evaluate on"); its ids are the folder's relative paths."""
    folder = tmp_path / "imgs"
    for cls in ("cat", "dog"):
        copy_jpgs(folder / cls, cls, 6)
    pool = tmp_path / "pool"
    assert main(["pack", f"folder:{folder}", str(pool)]) == 0
    proj = tmp_path / "proj"
    base = ["--model", "mlp", "--epochs", "1", "--backend", "local"]
    assert main(["project", "init", str(proj), "--pool", f"parquet:{pool}", "--classes", "cat,dog", *base]) == 0
    assert main(["project", "next", str(proj), "--k", "4"]) == 0
    rows = (proj / "batches" / "0" / "batch.csv").read_text().splitlines()[1:]
    ids = [r.split(",")[0] for r in rows]
    assert len(set(ids)) == 4 and all(i.split("/")[0] in ("cat", "dog") for i in ids)
    (tmp_path / "l.csv").write_text("id,label\n" + "".join(f"{i},{i.split('/')[0]}\n" for i in ids))
    assert main(["project", "import", str(proj), str(tmp_path / "l.csv")]) == 0
    assert main(["project", "next", str(proj), "--k", "3"]) == 0
    second = [r.split(",")[0] for r in (proj / "batches" / "1" / "batch.csv").read_text().splitlines()[1:]]
    assert len(second) == 3 and not set(second) & set(ids)
    assert set(second) <= {f"{c}/{i:04d}.jpg" for c in ("cat", "dog") for i in range(6)}
