"""Datasets as uint8 tensors, the paper's imbalanced pools, and the data-root rules.

Data root: --data-dir, else $FM_RAY_DATA, else the user cache. We never write into a data root we
did not create: torchvision extracts next to its archives, so archives are copied into our cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fm_ray.config import DataConfig
from fm_ray.errors import UserError
from fm_ray.pool.source import ImageSource, TensorImages

FMNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
DATASETS = ("fashion_mnist", "cifar10", "imagefolder:<path>", "parquet:<path or URI>")

# The paper's settings (fishermask.md section 5): class -> pool count.
SETTINGS: dict[str, dict[int, int] | None] = {
    "setting1": {0: 250, 1: 5000, 2: 250, 3: 250},
    "setting2": {**{c: 250 for c in range(9)}, 9: 5000},
    "balanced": None,  # the whole train split
}


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


@dataclass(frozen=True)
class Pool:
    """The active-learning pool: positions 0..T-1 map to train-split indices `train_index`."""

    train_index: np.ndarray  # (T,) indices into the train split
    labels: np.ndarray  # (T,) labels remapped to 0..C-1
    classes: tuple[int, ...]  # original class id of each model output
    test_index: np.ndarray  # test-split indices restricted to `classes`
    test_labels: np.ndarray  # remapped like `labels`


def cache_dir() -> Path:
    base = os.environ.get("FM_RAY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fm_ray"
    )
    return Path(base)


def data_root(cfg: DataConfig) -> Path:
    root = cfg.data_dir or os.environ.get("FM_RAY_DATA")
    return Path(root).expanduser() if root else cache_dir() / "data"


def _work_dir(root: Path) -> Path:
    """Where torchvision may extract for `root`: the root itself if it is our cache, else a copy
    beside the cache keyed by the root, so a read-only or shared root is never written."""
    own = cache_dir() / "data"
    if root.resolve() == own.resolve():
        return own
    return cache_dir() / "extracted" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


def _offline() -> bool:
    return os.environ.get("FM_RAY_OFFLINE", "") not in ("", "0")


def load_dataset(cfg: DataConfig) -> ImageData:
    root = data_root(cfg)
    if cfg.dataset == "fashion_mnist":
        return _fashion_mnist(root)
    if cfg.dataset == "cifar10":
        return _cifar10(root)
    if cfg.dataset.startswith("imagefolder:"):
        return _imagefolder(Path(cfg.dataset.split(":", 1)[1]).expanduser())
    raise UserError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")


def _fashion_mnist(root: Path) -> ImageData:
    import torchvision

    src = root / "FashionMNIST" / "raw"
    cache = _work_dir(root)
    dst = cache / "FashionMNIST" / "raw"
    if src.is_dir() and src.resolve() != dst.resolve():
        dst.mkdir(parents=True, exist_ok=True)
        for name in FMNIST_FILES:
            if (src / name).is_file() and not (dst / name).is_file():
                shutil.copy2(src / name, dst / name)
    have_all = all((dst / n).is_file() for n in FMNIST_FILES)
    if not have_all and _offline():
        raise _missing("fashion_mnist", src, ", ".join(FMNIST_FILES))
    try:
        splits = [torchvision.datasets.FashionMNIST(str(cache), train=t, download=True) for t in (True, False)]
    except Exception as e:  # network down, bad archive, ...
        raise _missing("fashion_mnist", src, ", ".join(FMNIST_FILES), e) from None
    (tr, te) = splits
    return ImageData(
        "fashion_mnist",
        tr.data.unsqueeze(1).contiguous(),
        tr.targets.long(),
        te.data.unsqueeze(1).contiguous(),
        te.targets.long(),
        mean=(0.2860,),
        std=(0.3530,),
        augment=False,
    )


def _cifar10(root: Path) -> ImageData:
    import torchvision

    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    jpg = root / "CIFAR10-jpg"
    if (root / "cifar-10-batches-py").is_dir():
        tv_root = str(root)
    elif (jpg / "train").is_dir() and (jpg / "test").is_dir():
        # ImageFolder sorts class folders alphabetically: the standard CIFAR-10 label order.
        train_x, train_y = _decode_folder(jpg / "train")
        test_x, test_y = _decode_folder(jpg / "test")
        return ImageData("cifar10", train_x, train_y, test_x, test_y, mean, std, augment=True)
    elif _offline():
        raise _missing(
            "cifar10",
            root,
            "cifar-10-batches-py/ (torchvision) or CIFAR10-jpg/{train,test}/<class>/",
        )
    else:
        tv_root = str(_work_dir(root))
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


def _imagefolder(path: Path) -> ImageData:
    if not ((path / "train").is_dir() and (path / "test").is_dir()):
        raise UserError(
            f"imagefolder dataset {path} needs train/ and test/ folders with one sub-folder per class: create them"
        )
    train_x, train_y = _decode_folder(path / "train")
    test_x, test_y = _decode_folder(path / "test")
    scaled = train_x.float().div_(255)
    dims = (0, 2, 3)
    mean = tuple(float(v) for v in scaled.mean(dims))
    std = tuple(float(v) for v in scaled.std(dims))
    return ImageData(f"imagefolder:{path}", train_x, train_y, test_x, test_y, mean, std, augment=True)


def _decode_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an ImageFolder into (uint8 N x 3 x H x W, labels), cached by folder path and listing."""
    from torchvision.datasets import ImageFolder
    from torchvision.io import ImageReadMode, decode_image, read_file

    ds = ImageFolder(str(folder))
    key = hashlib.sha256(f"{folder.resolve()}|{len(ds.samples)}|{ds.classes}".encode()).hexdigest()[:16]
    cached = cache_dir() / "decoded" / f"{folder.name}-{key}.pt"
    if cached.is_file():
        blob = torch.load(cached)
        return blob["x"], blob["y"]
    images = [decode_image(read_file(p), mode=ImageReadMode.RGB) for p, _ in ds.samples]
    if len({tuple(im.shape) for im in images}) > 1:
        raise UserError(f"images under {folder} differ in size: resize them to one size first")
    x = torch.stack(images)
    y = torch.tensor(ds.targets, dtype=torch.long)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    torch.save({"x": x, "y": y}, tmp)
    tmp.replace(cached)
    return x, y


def _missing(name: str, where: Path, expected: str, err: Exception | None = None) -> UserError:
    why = f" ({type(err).__name__}: {str(err).splitlines()[0][:120]})" if err else ""
    return UserError(
        f"dataset {name} not found under {where} and not downloadable{why}: put {expected} there, "
        "or point --data-dir / FM_RAY_DATA at a folder that has them"
    )


def class_counts_for(cfg: DataConfig, train_y: torch.Tensor) -> dict[int, int]:
    if cfg.class_counts is not None:
        return dict(cfg.class_counts)
    if cfg.setting not in SETTINGS:
        raise UserError(
            f"unknown setting {cfg.setting!r}: choose one of {', '.join(SETTINGS)} or give --class-counts 0:250,1:5000"
        )
    counts = SETTINGS[cfg.setting]
    if counts is None:
        return {int(c): int(n) for c, n in zip(*np.unique(train_y.numpy(), return_counts=True), strict=True)}
    return counts


def make_pool(cfg: DataConfig, data: ImageData, seed: int) -> Pool:
    """Sample the pool per class with the seed; restrict the test split to the same classes."""
    counts = class_counts_for(cfg, data.train_y)
    train_y = data.train_y.numpy()
    rng = np.random.default_rng([seed, 0])
    picked = []
    for c in sorted(counts):
        members = np.flatnonzero(train_y == c)
        if counts[c] > len(members):
            raise UserError(
                f"class {c} of {data.name} has {len(members)} train samples, {counts[c]} asked: lower its count"
            )
        picked.append(rng.choice(members, size=counts[c], replace=False))
    train_index = np.sort(np.concatenate(picked))
    classes = tuple(sorted(counts))
    remap = {c: i for i, c in enumerate(classes)}
    test_y = data.test_y.numpy()
    test_index = np.flatnonzero(np.isin(test_y, classes))
    return Pool(
        train_index=train_index,
        labels=np.array([remap[int(c)] for c in train_y[train_index]], dtype=np.int64),
        classes=classes,
        test_index=test_index,
        test_labels=np.array([remap[int(c)] for c in test_y[test_index]], dtype=np.int64),
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


def load_pool_data(cfg: DataConfig) -> PoolData:
    if cfg.dataset.startswith("parquet:"):
        return _packed(cfg.dataset.split(":", 1)[1])
    d = load_dataset(cfg)
    return PoolData(
        d.name, TensorImages(d.train_x), d.train_y, TensorImages(d.test_x), d.test_y, d.mean, d.std, d.augment
    )


def _packed(where: str) -> PoolData:
    from fm_ray.packed import open_pool

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
