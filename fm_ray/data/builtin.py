"""Datasets as uint8 tensors, the paper's imbalanced pools, and the data-root rules.

Data root: --data-dir, else $FM_RAY_DATA, else the user cache. We never write into a data root we
did not create: Fashion-MNIST's archives are read in place, and what is missing is downloaded into
our cache ($FM_RAY_CACHE); decoded image folders are cached there too (fm_ray.imagefolder).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fm_ray._internal.files import cache_dir, offline, writable_dir, write_atomically
from fm_ray._internal.log import log
from fm_ray.config import DataConfig
from fm_ray.data import imagefolder
from fm_ray.data.source import ImageSource, TensorImages
from fm_ray.errors import UserError

# The release's archives and their md5 (torchvision's FashionMNIST.resources), in reading order.
FMNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# ImageFolder's sorted class folders are CIFAR-10's label order only with exactly these names.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DATASETS = ("fashion_mnist", "cifar10", "imagefolder:<path>", "parquet:<path or URI>")


@dataclass(frozen=True)
class ImageData:
    """One dataset in memory. Images are uint8 (N, channels, H, W); labels are int64 class ids."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # RandomCrop(pad 4) + horizontal flip while training (the paper's CIFAR-10 recipe)
    skipped_images: tuple[tuple[str, str], ...] = ()  # (file, why) dropped by --skip-bad-images


def data_root(cfg: DataConfig) -> Path:
    root = cfg.data_dir or os.environ.get("FM_RAY_DATA")
    return Path(root).expanduser() if root else cache_dir() / "data"


def _work_dir(root: Path) -> Path:
    """Where downloads for `root` go: the root itself if it is our cache, else a folder in the
    cache keyed by the root, so a read-only or shared root is never written."""
    own = cache_dir() / "data"
    if root.resolve() == own.resolve():
        return own
    return cache_dir() / "extracted" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


def load_dataset(cfg: DataConfig) -> ImageData:
    root = data_root(cfg)
    if cfg.dataset == "fashion_mnist":
        return _fashion_mnist(root)
    if cfg.dataset == "cifar10":
        return _cifar10(root, cfg.skip_bad_images)
    if cfg.dataset.startswith("imagefolder:"):
        return _imagefolder(Path(cfg.dataset.split(":", 1)[1]).expanduser(), cfg.skip_bad_images)
    raise UserError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")


def _fashion_mnist(root: Path) -> ImageData:
    """Read the four idx archives in place (nothing is copied, so no copy can go stale), each checked
    against its release md5; a file missing from the data root is downloaded into our cache."""
    src = root / "FashionMNIST" / "raw"
    own = _work_dir(root) / "FashionMNIST" / "raw"
    tensors = [_read_idx(_fmnist_file(src, own, name, md5)) for name, md5 in FMNIST_FILES.items()]
    train_x, train_y, test_x, test_y = tensors
    return ImageData(
        "fashion_mnist",
        train_x.unsqueeze(1).contiguous(),
        train_y.long(),
        test_x.unsqueeze(1).contiguous(),
        test_y.long(),
        mean=(0.2860,),
        std=(0.3530,),
        augment=False,
    )


def _fmnist_file(src: Path, own: Path, name: str, md5: str) -> Path:
    """The archive `name` with the right md5: from the data root, else our cache, else downloaded."""
    for where in (src, own):  # the same folder twice when the data root is our cache
        path = where / name
        if not path.is_file():
            continue
        found = _md5(path)
        if found == md5:
            return path
        if where.resolve() != own.resolve():
            raise UserError(
                f"{path} is damaged or not the Fashion-MNIST release (md5 {found}, expected {md5}): "
                "replace it with the original file"
            )
        log(f"cached {path} is damaged (md5 mismatch): fetching it again")
        path.unlink()
    if offline():
        raise _missing("fashion_mnist", src, ", ".join(FMNIST_FILES))
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    writable_dir(own)
    with tempfile.TemporaryDirectory(dir=own, prefix=".download-") as tmp:
        try:  # download_url checks the md5; the rename makes the file appear whole or not at all
            download_url(FashionMNIST.mirrors[0] + name, tmp, name, md5)
        except Exception as e:  # network down, bad archive, ...
            raise _missing("fashion_mnist", src, ", ".join(FMNIST_FILES), e) from None
        os.replace(Path(tmp, name), own / name)
    return own / name


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _read_idx(path: Path) -> torch.Tensor:
    """An idx file (gzip, uint8 data; the format of LeCun's MNIST page) -> uint8 tensor of its dims."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim :]
    if raw[:3] != b"\x00\x00\x08" or len(body) != math.prod(dims):
        raise UserError(f"{path} is not an idx file of uint8 data: replace it with the original file")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*dims)


def _cifar10(root: Path, skip_bad: bool) -> ImageData:
    import torchvision

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    jpg = root / "CIFAR10-jpg"
    if (root / "cifar-10-batches-py").is_dir():
        tv_root = str(root)
    elif (jpg / "train").is_dir() and (jpg / "test").is_dir():
        train, test, _ = imagefolder.load_splits(jpg, cache_dir() / "decoded", skip_bad, CIFAR10_CLASSES)
        skipped = train.skipped + test.skipped
        return ImageData("cifar10", train.x, train.y, test.x, test.y, mean, std, augment=True, skipped_images=skipped)
    elif offline():
        raise _missing(
            "cifar10",
            root,
            "cifar-10-batches-py/ (torchvision) or CIFAR10-jpg/{train,test}/<class>/",
        )
    else:
        tv_root = str(writable_dir(_work_dir(root)))
    try:
        tr, te = (torchvision.datasets.CIFAR10(tv_root, train=t, download=tv_root != str(root)) for t in (True, False))
    except Exception as e:
        raise _missing(
            "cifar10",
            root,
            "cifar-10-batches-py/ (torchvision) or CIFAR10-jpg/{train,test}/<class>/",
            e,
        ) from None

    def to_tensor(
        ds: torchvision.datasets.CIFAR10,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    return ImageData("cifar10", *to_tensor(tr), *to_tensor(te), mean, std, augment=True)


def _imagefolder(path: Path, skip_bad: bool) -> ImageData:
    if not ((path / "train").is_dir() and (path / "test").is_dir()):
        raise UserError(
            f"imagefolder dataset {path} needs train/ and test/ folders with one sub-folder per class: create them"
        )
    train, test, _ = imagefolder.load_splits(path, cache_dir() / "decoded", skip_bad)
    scaled = train.x.float().div_(255)
    dims = (0, 2, 3)
    mean = tuple(float(v) for v in scaled.mean(dims))
    std = tuple(float(v) for v in scaled.std(dims))
    return ImageData(
        f"imagefolder:{path}",
        train.x,
        train.y,
        test.x,
        test.y,
        mean,
        std,
        augment=True,
        skipped_images=train.skipped + test.skipped,
    )


SKIPPED_IMAGES_CSV = "skipped_images.csv"


def write_skipped_images(run_dir: Path, data: ImageData | PoolData) -> None:
    """List the images --skip-bad-images dropped as run_dir/skipped_images.csv (file, reason); remove
    a list left by an earlier run in the same folder when none were dropped."""
    path = run_dir / SKIPPED_IMAGES_CSV
    if not data.skipped_images:
        path.unlink(missing_ok=True)
        return
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["file", "reason"])
    writer.writerows(data.skipped_images)
    write_atomically(path, lambda f: f.write(text.getvalue().encode()))
    log(f"skipped {len(data.skipped_images)} images that cannot be decoded: listed in {path}")


def _missing(name: str, where: Path, expected: str, err: Exception | None = None) -> UserError:
    why = f" ({type(err).__name__}: {str(err).splitlines()[0][:120]})" if err else ""
    return UserError(
        f"dataset {name} not found under {where} and not downloadable{why}: put {expected} there, "
        "or point --data-dir / FM_RAY_DATA at a folder that has them"
    )


# -- packed Parquet pools (`--dataset parquet:<path or URI>`, written by `fm-ray pack`) ------------
@dataclass(frozen=True)
class PoolData:
    """A dataset as the loop uses it: labels in memory, pixels behind `ImageSource`s read on demand.

    Built-ins and image folders wrap their in-RAM tensors; a packed pool reads Parquet row groups,
    so a driver holds the pixels only of what it reads (the labeled set and the test split).
    """

    name: str
    train: ImageSource
    train_y: torch.Tensor
    test: ImageSource
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    skipped_images: tuple[tuple[str, str], ...] = ()  # (file, why) dropped by --skip-bad-images


def load_pool_data(cfg: DataConfig) -> PoolData:
    if cfg.dataset.startswith("parquet:"):
        return _packed(cfg.dataset.split(":", 1)[1])
    d = load_dataset(cfg)
    train, test = TensorImages(d.train_x), TensorImages(d.test_x)
    return PoolData(d.name, train, d.train_y, test, d.test_y, d.mean, d.std, d.augment, d.skipped_images)


def _packed(where: str) -> PoolData:
    from fm_ray.data.parquet import open_pool

    pool = open_pool(where)
    m = pool.manifest
    if "test" not in pool.splits:
        raise UserError(f"pool {where} has no test split to evaluate on: pack a source with test images")
    labels = {s: pool.columns(s).column("label") for s in ("train", "test")}
    for split, col in labels.items():
        if col.null_count:
            raise UserError(
                f"pool {where} has {col.null_count} unlabeled {split} rows: active learning needs every label; "
                "pack a labeled source (imagefolder:, csv: with a label column)"
            )
    train_y, test_y = (torch.from_numpy(labels[s].to_numpy().astype(np.int64)) for s in ("train", "test"))
    return PoolData(
        f"parquet:{where}", pool.images("train"), train_y, pool.images("test"), test_y,
        tuple(m["mean"]), tuple(m["std"]), bool(m["augment"]),
    )  # fmt: skip
