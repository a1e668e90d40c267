"""Issue 11, data layer: no silent wrong result from class folders, caches or bad images.

Image folders are built in tmp_path from real CIFAR-10 JPEGs; every test has its own cache folder.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fm_ray.cli import main
from fm_ray.config import DataConfig
from fm_ray.data import builtin as fdata
from fm_ray.data.core import Dataset
from fm_ray.data.decode import BadImage, decode_image_bytes
from fm_ray.data.registry import open_source
from fm_ray.errors import UserError

SHARED = Path(os.environ["FM_RAY_DATA"])
CIFAR = SHARED / "CIFAR10-jpg"
FMNIST_RAW = SHARED / "FashionMNIST" / "raw"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FM_RAY_CACHE", str(cache))
    return cache


def real_jpgs(cifar_class: str, n: int, start: int = 0) -> list[Path]:
    return [CIFAR / "train" / cifar_class / f"{i:04d}.jpg" for i in range(start, start + n)]


def make_folder(
    root: Path, train: dict[str, str], test: dict[str, str] | None = None, n_train: int = 3, n_test: int = 2
) -> Path:
    """root/{train,test}/<name>/ filled with real JPEGs of the CIFAR-10 class each name maps to."""
    for split, classes, n, start in (("train", train, n_train, 0), ("test", test or train, n_test, 100)):
        for name, cifar_class in classes.items():
            (root / split / name).mkdir(parents=True)
            for src in real_jpgs(cifar_class, n, start):
                shutil.copy(src, root / split / name / src.name)
    return root


def pil_rgb(path: Path | str) -> torch.Tensor:
    """An independent decode: PIL straight to an RGB array."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def load_folder(root: Path, skip: bool = False) -> Dataset:
    return open_source(DataConfig(dataset=f"imagefolder:{root}", skip_bad_images=skip))


THREE = {"bird": "bird", "cat": "cat", "ship": "ship"}


# --- item 2: class names of the two splits -----------------------------------------------------


def test_labels_and_pixels_follow_the_class_folders(tmp_path):
    root = make_folder(tmp_path / "ds", THREE)
    data = load_folder(root)
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        files = sorted((root / split).glob("*/*.jpg"))
        assert [sorted(THREE).index(f.parent.name) for f in files] == y.tolist()
        assert torch.equal(x, torch.stack([pil_rgb(f) for f in files]))


@pytest.mark.parametrize(
    "test_classes, message",
    [
        ({"bird": "bird", "ship": "ship"}, r"only in train: \['cat'\], only in test: \[\]"),
        ({"bird": "bird", "kitty": "cat", "ship": "ship"}, r"only in train: \['cat'\], only in test: \['kitty'\]"),
        ({**THREE, "truck": "truck"}, r"only in train: \[\], only in test: \['truck'\]"),
    ],
    ids=["test-class-missing", "test-class-renamed", "test-class-extra"],
)
def test_splits_with_different_classes_are_refused(tmp_path, test_classes, message):
    root = make_folder(tmp_path / "ds", THREE, test_classes)
    with pytest.raises(UserError, match=message) as err:
        load_folder(root)
    assert "train/ classes ['bird', 'cat', 'ship'] and test/ classes" in str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_one_class_is_refused(tmp_path):
    root = make_folder(tmp_path / "ds", {"cat": "cat"})
    with pytest.raises(UserError, match=r"train/ has 1 class folder\(s\) \['cat'\]: a classifier needs at least 2"):
        load_folder(root)


def test_hidden_folders_are_not_classes(tmp_path):
    root = make_folder(tmp_path / "ds", THREE)
    # Jupyter leaves these; torchvision's ImageFolder would make it class 0 and shift every label
    (root / "train" / ".ipynb_checkpoints").mkdir()
    shutil.copy(real_jpgs("dog", 1)[0], root / "train" / ".ipynb_checkpoints" / "x.jpg")
    data = load_folder(root)
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_empty_class_folder_is_named(tmp_path):
    root = make_folder(tmp_path / "ds", THREE)
    for f in (root / "test" / "cat").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=f"class folder {root / 'test' / 'cat'} holds no images"):
        load_folder(root)


def test_cifar10_jpg_needs_cifar10_class_names(tmp_path):
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    classes = {("lorry" if n == "truck" else n): n for n in names}
    make_folder(tmp_path / "CIFAR10-jpg", classes, n_train=1, n_test=1)
    with pytest.raises(UserError, match=r"has classes .*'lorry', 'ship'\], not \['airplane',"):
        open_source(DataConfig(dataset="cifar10", data_dir=str(tmp_path)))


# --- item 4: caches --------------------------------------------------------------------------------


def test_replaced_image_is_decoded_again(tmp_path, own_cache):
    root = make_folder(tmp_path / "ds", THREE)
    before = load_folder(root)
    target = sorted((root / "train" / "cat").iterdir())[1]
    stat = target.stat()
    shutil.copyfile(real_jpgs("cat", 1, start=50)[0], target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or a restore would
    after = load_folder(root)
    assert not torch.equal(after.train_x[4], before.train_x[4])
    assert torch.equal(after.train_x[4], pil_rgb(target))
    assert torch.equal(after.train_x[:4], before.train_x[:4])
    assert len(list((own_cache / "decoded").glob("train-*.pt"))) == 1  # the outdated decode is gone


def test_damaged_decoded_cache_is_decoded_again(tmp_path, own_cache):
    root = make_folder(tmp_path / "ds", THREE)
    expected = load_folder(root)
    cached = sorted((own_cache / "decoded").glob("*.pt"))
    assert len(cached) == 2  # train and test
    cached[0].write_bytes(cached[0].read_bytes()[:1000])  # cut short
    cached[1].write_bytes(b"not a torch file")
    again = load_folder(root)
    assert torch.equal(again.train_x, expected.train_x) and torch.equal(again.test_x, expected.test_x)
    assert torch.equal(again.train_y, expected.train_y) and torch.equal(again.test_y, expected.test_y)
    for path in cached:  # rewritten whole
        assert torch.load(path, weights_only=True)["x"].dtype == torch.uint8


CHILD = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    import torch
    from fm_ray.config import DataConfig
    from fm_ray.data.registry import open_source

    root, sync, me = sys.argv[1], sys.argv[2], sys.argv[3]
    real_save, saves = torch.save, [0]

    def save_then_wait(obj, f, *args, **kwargs):
        # Both processes have written their cache file before either renames it: the old code's
        # shared temporary name then makes one of them fail.
        real_save(obj, f, *args, **kwargs)
        saves[0] += 1
        open(os.path.join(sync, f"{saves[0]}-{me}"), "w").close()
        # a barrier on a state (both files there), with no deadline: on a slow machine the other
        # process may take long, and a time-out would let this one pass without the race
        while len([n for n in os.listdir(sync) if n.startswith(f"{saves[0]}-")]) < 2:
            time.sleep(0.01)

    torch.save = save_then_wait
    data = open_source(DataConfig(dataset="imagefolder:" + root))
    print(json.dumps({
        "saves": saves[0],
        "train_x": hashlib.sha256(data.train_x.numpy().tobytes()).hexdigest(),
        "test_x": hashlib.sha256(data.test_x.numpy().tobytes()).hexdigest(),
        "train_y": data.train_y.tolist(),
        "test_y": data.test_y.tolist(),
    }))
    """
)


def test_two_processes_decoding_one_folder_both_get_it(tmp_path):
    import hashlib

    root = make_folder(tmp_path / "ds", THREE)
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), str(sync), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=900) for p in procs]  # a hang guard only
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [r["saves"] for r in results] == [2, 2]  # each decoded both splits itself, at the same time

    def digest(split: str) -> str:
        stacked = torch.stack([pil_rgb(f) for f in sorted((root / split).glob("*/*.jpg"))])
        return hashlib.sha256(stacked.numpy().tobytes()).hexdigest()

    for r in results:
        assert (r["train_x"], r["test_x"]) == (digest("train"), digest("test"))
        assert r["train_y"] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and r["test_y"] == [0, 0, 1, 1, 2, 2]
    assert load_folder(root).train_x.shape == (9, 3, 32, 32)  # and the cache they left is whole


def fmnist_root(tmp_path: Path, names=tuple(fdata.FMNIST_FILES)) -> Path:
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in names:
        (raw / name).symlink_to(FMNIST_RAW / name)
    return tmp_path / "data"


def test_fmnist_is_read_from_the_source_not_a_stale_copy(tmp_path, fmnist, own_cache):
    root = fmnist_root(tmp_path)
    # what the old code left in the cache: a damaged archive copy and a damaged extraction of it
    stale = fdata._work_dir(root) / "FashionMNIST" / "raw"
    stale.mkdir(parents=True)
    for name in fdata.FMNIST_FILES:
        (stale / name).write_bytes(b"half an archive")
        (stale / name.removesuffix(".gz")).write_bytes(b"\x00" * 64)
    data = open_source(DataConfig(dataset="fashion_mnist", data_dir=str(root)))
    assert torch.equal(data.train_x, fmnist.train_x) and torch.equal(data.test_y, fmnist.test_y)
    assert data.train_y[:5].tolist() == [9, 0, 0, 3, 0]  # the first labels of the real train file


def test_fmnist_reader_matches_torchvision(tmp_path):
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        plain = tmp_path / name.removesuffix(".gz")
        plain.write_bytes(gzip.decompress((FMNIST_RAW / name).read_bytes()))
        assert torch.equal(fdata._read_idx(FMNIST_RAW / name), read_sn3_pascalvincent_tensor(str(plain)))


def test_damaged_fmnist_source_is_named(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    root = fmnist_root(tmp_path, [n for n in fdata.FMNIST_FILES if n != name])
    bad = bytearray((FMNIST_RAW / name).read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    (root / "FashionMNIST" / "raw" / name).write_bytes(bytes(bad))
    with pytest.raises(UserError, match=f"{root / 'FashionMNIST' / 'raw' / name} is damaged .*expected bb300cf"):
        open_source(DataConfig(dataset="fashion_mnist", data_dir=str(root)))


def test_missing_fmnist_file_is_downloaded_into_the_cache(tmp_path, monkeypatch, fmnist, own_cache):
    import torchvision.datasets.utils as tv_utils

    fetched = []

    def fake_download(url, root, filename, md5):  # the network, played by the real file
        fetched.append(url)
        shutil.copy(FMNIST_RAW / filename, Path(root, filename))

    monkeypatch.setattr(tv_utils, "download_url", fake_download)
    monkeypatch.delenv("FM_RAY_OFFLINE")
    name = "t10k-images-idx3-ubyte.gz"
    root = fmnist_root(tmp_path, [n for n in fdata.FMNIST_FILES if n != name])
    data = open_source(DataConfig(dataset="fashion_mnist", data_dir=str(root)))
    assert torch.equal(data.test_x, fmnist.test_x)
    assert fetched == ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" + name]
    raw = fdata._work_dir(root) / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [name]  # no temporary left behind
    assert not (root / "FashionMNIST" / "raw" / name).exists()  # the data root is never written


def test_missing_fmnist_file_comes_from_a_verified_cache_copy(tmp_path, fmnist):
    name = "t10k-labels-idx1-ubyte.gz"
    root = fmnist_root(tmp_path, [n for n in fdata.FMNIST_FILES if n != name])
    copy = fdata._work_dir(root) / "FashionMNIST" / "raw" / name
    copy.parent.mkdir(parents=True)
    copy.write_bytes((FMNIST_RAW / name).read_bytes()[:-100])  # an interrupted copy or download
    cfg = DataConfig(dataset="fashion_mnist", data_dir=str(root))
    with pytest.raises(UserError, match="not found .* and not downloadable"):
        open_source(cfg)  # offline in tests: the damaged copy is never used ...
    assert not copy.exists()  # ... and removed, so an online run fetches it again
    shutil.copy(FMNIST_RAW / name, copy)
    assert torch.equal(open_source(cfg).test_y, fmnist.test_y)


# --- item 5: bad images, sizes, the cache folder ----------------------------------------------------


def png_bytes(jpg: Path) -> bytes:
    out = io.BytesIO()
    Image.open(jpg).save(out, "PNG")
    return out.getvalue()


def bad_files(jpg: Path) -> dict[str, bytes]:
    good, png = jpg.read_bytes(), png_bytes(jpg)
    return {
        "empty.jpg": b"",
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.png": png[:60] + bytes(b ^ 0xFF for b in png[60:200]) + png[200:],
        "unsupported.tif": b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"/>',
    }


@pytest.mark.parametrize("bad", ["empty.jpg", "truncated.jpg", "corrupt.png", "unsupported.tif"])
def test_bad_image_exits_2_naming_the_file(tmp_path, capsys, bad):
    root = make_folder(tmp_path / "ds", THREE)
    path = root / "train" / "cat" / bad
    path.write_bytes(bad_files(real_jpgs("cat", 1)[0])[bad])
    out = tmp_path / "run"
    code = main(["run", "--dataset", f"imagefolder:{root}", "--setting", "balanced", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"image {path} cannot be decoded (" in err and "--skip-bad-images" in err
    assert not out.exists()


def test_skip_bad_images_drops_and_lists_them(tmp_path, capsys):
    root = make_folder(tmp_path / "ds", THREE, n_train=4)
    bad = {root / "train" / "cat" / name: b for name, b in bad_files(real_jpgs("cat", 1)[0]).items()}
    bad[root / "test" / "bird" / "empty.jpg"] = b""
    for path, content in bad.items():
        path.write_bytes(content)
    data = load_folder(root, skip=True)
    assert sorted(f for f, _ in data.skipped_images) == sorted(str(p) for p in bad)
    assert data.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and data.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    good = sorted(f for f in (root / "train").glob("*/*") if f not in bad)
    assert torch.equal(data.train_x, torch.stack([pil_rgb(f) for f in good]))

    with pytest.raises(BadImage):  # the cache of a skipping run does not make a strict run skip
        load_folder(root)

    out = tmp_path / "run"
    args = ["run", "--dataset", f"imagefolder:{root}", "--setting", "balanced", "--model", "mlp"]
    args += ["--backend", "local", "--init", "4", "--batch", "2", "--rounds", "1", "--epochs", "1", "--out", str(out)]
    assert main([*args, "--skip-bad-images"]) == 0, capsys.readouterr().err
    with open(out / "skipped_images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["file"] for r in rows) == sorted(str(p) for p in bad)
    assert {r["file"]: r["reason"] for r in rows}[str(root / "train" / "cat" / "empty.jpg")] == "empty file"
    assert json.loads((out / "config.json").read_text())["config"]["data"]["skip_bad_images"] is True


def test_images_of_different_sizes_name_two_files(tmp_path):
    root = make_folder(tmp_path / "ds", THREE)
    small = sorted((root / "train" / "ship").iterdir())[0]
    Image.open(small).resize((16, 16)).save(small, "JPEG")
    first = sorted((root / "train" / "bird").iterdir())[0]
    with pytest.raises(UserError, match=f"images differ in size: {first} is 32x32, {small} is 16x16: resize"):
        load_folder(root, skip=True)  # not a bad image: skipping does not hide it


def test_test_images_of_another_size_are_refused(tmp_path):
    root = make_folder(tmp_path / "ds", THREE)
    for f in (root / "test").glob("*/*.jpg"):
        Image.open(f).resize((28, 28)).save(f, "JPEG")
    with pytest.raises(UserError, match=r"is 32x32, .*test/bird/\S+ is 28x28: resize them to one size"):
        load_folder(root)


def test_non_square_images_are_refused(tmp_path):
    root = make_folder(tmp_path / "ds", THREE)
    for f in root.glob("*/*/*.jpg"):
        Image.open(f).crop((0, 0, 32, 24)).save(f, "JPEG")
    with pytest.raises(UserError, match="images are 24x32 .* not square: crop or resize them to square"):
        load_folder(root)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000
    out = io.BytesIO()
    Image.fromarray(values).save(out, "PNG")
    got = decode_image_bytes(out.getvalue(), "grey16.png")
    expected = np.round(values / 65535 * 255).astype(np.uint8)  # PIL's own convert gives 255 for all but 0
    assert got.shape == (1, 4, 4) and np.array_equal(got[0].numpy(), expected)


def test_cache_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "ds", THREE)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("FM_RAY_CACHE", str(blocker))
    with pytest.raises(UserError, match=f"cache folder {blocker / 'decoded'} is not writable .*: point FM_RAY_CACHE"):
        load_folder(root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder_is_one_line(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "ds", THREE)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    monkeypatch.setenv("FM_RAY_CACHE", str(locked))
    with pytest.raises(UserError, match="is not writable .*: point FM_RAY_CACHE"):
        load_folder(root)


def test_fmnist_needs_no_writable_cache(tmp_path, monkeypatch, fmnist):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("FM_RAY_CACHE", str(blocker))
    assert torch.equal(open_source(DataConfig(dataset="fashion_mnist")).test_y, fmnist.test_y)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "cifar10"])
def test_a_failed_download_leaves_no_empty_folders_in_the_cache(dataset, tmp_path, monkeypatch, own_cache):
    """Missing data and no network (FM_RAY_OFFLINE unset): one error line, and the cache holds no
    folders made for the download that never came (issue 17)."""
    import torchvision
    import torchvision.datasets.utils as tv_utils

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", no_network)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    monkeypatch.delenv("FM_RAY_OFFLINE")
    (tmp_path / "nodata").mkdir()
    own_cache.mkdir()
    with pytest.raises(UserError, match=f"dataset {dataset} not found .* not downloadable .*network is unreachable"):
        open_source(DataConfig(dataset=dataset, data_dir=str(tmp_path / "nodata")))
    assert list(own_cache.rglob("*")) == []
