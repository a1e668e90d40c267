"""`fm-ray pack` on image files (decoded with Ray Data): same pixels as the source, resumable after an
interruption, byte-identical when re-run, and one clear line for each bad input."""

import csv
import filecmp
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from fm_ray.cli import main
from fm_ray.data.pack import PackInterrupted, pack
from fm_ray.data.parquet import open_pool
from fm_ray.errors import UserError

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def save_png(path: Path, x_C_H_W: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = x_C_H_W.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


@pytest.fixture(scope="module")
def folder(fmnist, tmp_path_factory):
    """A real-image ImageFolder: 3 classes x 7 train and 2 test FashionMNIST images as RGB PNGs."""
    root = tmp_path_factory.mktemp("imagefolder")
    expected = {"train": [], "test": []}
    for split, (x, y, per) in {
        "train": (fmnist.train_x, fmnist.train_y, 7),
        "test": (fmnist.test_x, fmnist.test_y, 2),
    }.items():
        for c, name in enumerate(["bag", "coat", "dress"]):  # sorted names: class index = c
            for j, i in enumerate(np.flatnonzero(y.numpy() == c)[:per]):
                rgb = x[i].expand(3, -1, -1).contiguous()
                save_png(root / split / name / f"img{j:02d}.png", rgb)
                expected[split].append((f"{split}/{name}/img{j:02d}.png", c, rgb))
    return root, expected


def all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_imagefolder_pack_holds_the_source_pixels_in_order(folder, tmp_path):
    root, expected = folder
    manifest = pack(f"imagefolder:{root}", str(tmp_path / "p"), rows_per_file=8)
    pool = open_pool(str(tmp_path / "p"))
    assert manifest["classes"] == ["bag", "coat", "dress"] and manifest["image_shape"] == [3, 28, 28]
    for split in ("train", "test"):
        cols = pool.columns(split).to_pylist()
        assert [(r["id"], r["label"]) for r in cols] == [(i, c) for i, c, _ in expected[split]]
        images = pool.images(split).read(np.arange(len(cols)))
        assert torch.equal(images, torch.stack([x for _, _, x in expected[split]]))
    # mean/std: the train pixels' own, as the in-RAM imagefolder computes them
    x = torch.stack([x for _, _, x in expected["train"]]).double() / 255
    assert np.allclose(manifest["mean"], x.mean((0, 2, 3)).tolist(), atol=1e-12)
    assert np.allclose(manifest["std"], x.std((0, 2, 3)).tolist(), atol=1e-12)
    assert [len(pq.ParquetFile(tmp_path / "p" / f).metadata.to_dict()["row_groups"]) for f in manifest["splits"]["train"]["files"]] == [1, 1, 1]  # fmt: skip
    assert manifest["splits"]["train"]["file_rows"] == [8, 8, 5]


def test_interrupted_pack_resumes_to_the_same_bytes(folder, tmp_path):
    root, _ = folder
    source = f"imagefolder:{root}"
    pack(source, str(tmp_path / "whole"), rows_per_file=4)
    with pytest.raises(PackInterrupted):
        pack(source, str(tmp_path / "cut"), rows_per_file=4, stop_after=3)
    cut = tmp_path / "cut"
    assert not (cut / "pool.json").exists() and len(list((cut / "train").glob("*.parquet"))) == 3
    assert not list(cut.rglob("*.tmp"))  # no half-written file left behind
    with pytest.raises(UserError, match="not an fm_ray pool"):
        open_pool(str(cut))
    before = {p: (cut / p).stat().st_mtime_ns for p in all_files(cut) if p.endswith(".parquet")}
    assert main(["pack", source, str(cut), "--rows-per-file", "4"]) == 0
    assert all((cut / p).stat().st_mtime_ns == t for p, t in before.items())  # finished files were kept
    assert all_files(cut) == all_files(tmp_path / "whole")
    # re-running a finished pack changes nothing; a fresh pack of the same source is byte-identical
    assert main(["pack", source, str(cut), "--rows-per-file", "4"]) == 0
    pack(source, str(tmp_path / "again"), rows_per_file=4)
    assert all_files(tmp_path / "again") == all_files(tmp_path / "whole")
    assert filecmp.cmp(cut / "pool.json", tmp_path / "again" / "pool.json", shallow=False)


def test_manifest_records_rows_digests_and_the_source_listing(folder, tmp_path):
    root, expected = folder
    manifest = pack(f"imagefolder:{root}", str(tmp_path / "p"), rows_per_file=8)
    for entry in manifest["splits"].values():
        files = [tmp_path / "p" / f for f in entry["files"]]
        digests = zip(files, entry["ids_sha256"], entry["labels_sha256"], entry["group_sha256"], strict=True)
        for f, ids, labels, groups in digests:
            rows = pq.read_table(f).to_pylist()  # one row group per file here (8 rows): its images, row by row
            assert groups == [hashlib.sha256(b"".join(r["image"] for r in rows)).hexdigest()]
            literal = hashlib.sha256(np.array([len(r["id"].encode()) for r in rows], "<i8").tobytes())
            literal.update("".join(r["id"] for r in rows).encode())
            assert ids == literal.hexdigest()
            values = [-1 if r["label"] is None else r["label"] for r in rows]
            assert labels == hashlib.sha256(np.array(values, "<i8").tobytes()).hexdigest()
        assert entry["file_rows"] == [pq.ParquetFile(f).metadata.num_rows for f in files]
    listing = pq.read_table(tmp_path / "p" / manifest["listing"]["file"]).to_pylist()
    want = [
        {"split": s, "id": i, "label": c, "bytes": (root / i).stat().st_size,
         "sha256": hashlib.sha256((root / i).read_bytes()).hexdigest()}
        for s in ("train", "test") for i, c, _ in expected[s]
    ]  # fmt: skip
    assert listing == want and manifest["listing"]["items"] == {"train": 21, "test": 6}


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_pack_resumed_after_the_source_changed_packs_the_new_contents(folder, fmnist, tmp_path):
    """Interrupted, then one image deleted and another added: the resumed pack equals a fresh pack of
    the folder as it is now (files of unchanged items kept), never a mix of old and new."""
    root = copy_folder(folder[0], tmp_path / "src")
    source = f"imagefolder:{root}"
    with pytest.raises(PackInterrupted):
        pack(source, str(tmp_path / "cut"), rows_per_file=4, stop_after=3)
    cut = tmp_path / "cut"
    kept = (cut / "train" / "part-00000.parquet").stat().st_mtime_ns
    (root / "train" / "coat" / "img03.png").unlink()  # in train/part-00002 (bag 0-6, coat 7-13)
    save_png(root / "train" / "dress" / "img99.png", fmnist.train_x[100].expand(3, -1, -1).contiguous())
    assert main(["pack", source, str(cut), "--rows-per-file", "4"]) == 0
    pack(source, str(tmp_path / "fresh"), rows_per_file=4)
    assert all_files(cut) == all_files(tmp_path / "fresh")
    assert (cut / "train" / "part-00000.parquet").stat().st_mtime_ns == kept  # items 0-3 did not change
    ids = open_pool(str(cut)).columns("train").column("id").to_pylist()
    assert "train/coat/img03.png" not in ids and "train/dress/img99.png" in ids and len(ids) == 21


def test_repacking_a_finished_pool_whose_source_changed_is_refused(folder, tmp_path, capsys):
    root = copy_folder(folder[0], tmp_path / "src")
    pack(f"imagefolder:{root}", str(tmp_path / "p"))
    (root / "test" / "bag" / "img00.png").write_bytes((root / "test" / "bag" / "img01.png").read_bytes())
    assert main(["pack", f"imagefolder:{root}", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert "the source has changed since: pack it into a new OUT" in err and len(err.splitlines()) == 1


def test_pack_into_a_foreign_or_mismatched_folder_is_refused(folder, tmp_path, capsys):
    root, _ = folder
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["pack", f"imagefolder:{root}", str(tmp_path / "busy")]) == 2
    assert "is not an fm_ray pool being packed" in capsys.readouterr().err
    pack(f"imagefolder:{root}", str(tmp_path / "p"), rows_per_file=8)
    assert main(["pack", f"imagefolder:{root}", str(tmp_path / "p"), "--rows-per-file", "5"]) == 2
    assert "already holds a pool packed from" in capsys.readouterr().err


def write_folder(root: Path, fmnist, sizes: list[int]) -> list[str]:
    names = []
    for k, side in enumerate(sizes):
        x = torch.nn.functional.interpolate(fmnist.train_x[k : k + 1].float(), size=(side, side)).to(torch.uint8)[0]
        name = f"sub{k % 2}/im{k}.png"
        save_png(root / name, x)
        names.append(name)
    return sorted(names)


def test_folder_of_unlabeled_images_with_a_bad_one(fmnist, tmp_path, capsys):
    src = tmp_path / "src"
    names = write_folder(src, fmnist, [28] * 5)
    (src / "sub1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["pack", f"folder:{src}", str(tmp_path / "p"), "--channels", "1"]) == 2
    err = capsys.readouterr().err
    assert "broken.png cannot be decoded" in err and "--skip-bad-images" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p" / "pool.json").exists()
    assert main(["pack", f"folder:{src}", str(tmp_path / "p"), "--channels", "1", "--skip-bad-images"]) == 0
    pool = open_pool(str(tmp_path / "p"))
    cols = pool.columns("train").to_pylist()
    assert [r["id"] for r in cols] == names and all(r["label"] is None for r in cols)
    assert pool.manifest["classes"] is None and "test" not in pool.splits
    with (tmp_path / "p" / "skipped_images.csv").open() as f:
        skipped = list(csv.DictReader(f))
    assert [s["file"] for s in skipped] == ["sub1/broken.png"] and skipped[0]["reason"]
    order = [int(n.split("im")[1][:-4]) for n in names]
    assert torch.equal(pool.images("train").read(np.arange(5)), fmnist.train_x[order])


def test_images_of_different_sizes_need_resize(fmnist, tmp_path, capsys):
    src = tmp_path / "src"
    write_folder(src, fmnist, [28, 28, 32, 28])
    assert main(["pack", f"folder:{src}", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "differ in size" in err and "32x32" in err and "--resize" in err
    # also when the odd image lands in a later file than the first ones
    assert main(["pack", f"folder:{src}", str(tmp_path / "q"), "--rows-per-file", "1"]) == 2
    assert "differ in size" in capsys.readouterr().err
    assert main(["pack", f"folder:{src}", str(tmp_path / "r"), "--resize", "16x20"]) == 0
    pool = open_pool(str(tmp_path / "r"))
    assert pool.shape == (1, 16, 20) and pool.splits["train"].rows == 4  # grey images stay grey


def test_csv_source_with_labels_and_splits(fmnist, tmp_path):
    src = tmp_path / "src"
    rows = []
    for k in range(6):
        save_png(src / "img" / f"{k}.png", fmnist.train_x[k])
        rows.append({"path": f"img/{k}.png", "label": ["cat", "dog"][k % 2], "split": "test" if k >= 4 else "train"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["path", "label", "split"])
    w.writeheader()
    w.writerows(rows)
    (src / "list.csv").write_text(buf.getvalue())
    manifest = pack(f"csv:{src / 'list.csv'}", str(tmp_path / "p"), channels=1)
    pool = open_pool(str(tmp_path / "p"))
    assert manifest["classes"] == ["cat", "dog"]
    assert pool.columns("train").to_pylist() == [{"id": f"img/{k}.png", "label": k % 2} for k in range(4)]
    assert pool.columns("test").column("label").to_pylist() == [0, 1]
    assert torch.equal(pool.images("test").read(np.array([1, 0])), fmnist.train_x[[5, 4]])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nosuch"], "unknown dataset"),
        (["folder:/no/such/folder"], "does not exist"),
        (["fashion_mnist", "--resize", "32"], "--resize is for image files"),
        (["folder:.", "--resize", "big"], "--resize must be N or HxW"),
    ],
)
def test_bad_pack_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert main(["pack", argv[0], str(tmp_path / "p"), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_pack_to_a_uri_equals_pack_to_a_path(folder, tmp_path):
    root, _ = folder
    pack(f"imagefolder:{root}", f"file://{tmp_path / 'by_uri'}")
    pack(f"imagefolder:{root}", str(tmp_path / "by_path"))
    assert all_files(tmp_path / "by_uri") == all_files(tmp_path / "by_path")
    m = json.loads((tmp_path / "by_uri" / "pool.json").read_text())
    assert {"classes", "mean", "std", "augment", "image_shape", "splits"} <= m.keys() and m["augment"] is True


def test_csv_with_a_duplicate_path_is_refused(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("path,label\na.png,0\nb.png,1\na.png,1\n")
    assert main(["pack", f"csv:{tmp_path / 'list.csv'}", str(tmp_path / "p")]) == 2
    assert "lists a.png twice" in capsys.readouterr().err
