"""The built-in datasets (`fashion_mnist`, `cifar10`) as uint8 tensors, and the data-root rules.

Data root: --data-dir, else $FM_RAY_DATA, else the user cache. We never write into a data root we
did not create: Fashion-MNIST's archives are read in place, and what is missing is downloaded into
our cache ($FM_RAY_CACHE); decoded image folders (CIFAR10-jpg) are cached there too (data.files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fm_ray._internal.files import cache_dir, offline, writable_dir
from fm_ray._internal.log import log
from fm_ray.data.core import Dataset, Split, tensor_split
from fm_ray.data.files import list_files, open_files
from fm_ray.data.normalize import Normalizer
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
FMNIST_MEAN_STD = ((0.2860,), (0.3530,))
CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def data_root(data_dir: str | None) -> Path:
    root = data_dir or os.environ.get("FM_RAY_DATA")
    return Path(root).expanduser() if root else cache_dir() / "data"


def _work_dir(root: Path) -> Path:
    """Where downloads for `root` go: the root itself if it is our cache, else a folder in the
    cache keyed by the root, so a read-only or shared root is never written."""
    own = cache_dir() / "data"
    if root.resolve() == own.resolve():
        return own
    return cache_dir() / "extracted" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


def open_fashion_mnist(data_dir: str | None) -> Dataset:
    """Read the four idx archives in place (nothing is copied, so no copy can go stale), each checked
    against its release md5; a file missing from the data root is downloaded into our cache."""
    root = data_root(data_dir)
    src = root / "FashionMNIST" / "raw"
    own = _work_dir(root) / "FashionMNIST" / "raw"
    tensors = [_read_idx(_fmnist_file(src, own, name, md5)) for name, md5 in FMNIST_FILES.items()]
    train_x, train_y, test_x, test_y = tensors
    from torchvision.datasets import FashionMNIST

    return Dataset(
        "fashion_mnist",
        _split("train", train_x.unsqueeze(1).contiguous(), train_y.long()),
        _split("test", test_x.unsqueeze(1).contiguous(), test_y.long()),
        tuple(FashionMNIST.classes),
        Normalizer(*FMNIST_MEAN_STD),
        augment=False,
        root=str(root),
    )


def _split(name: str, x_u8: torch.Tensor, y: torch.Tensor) -> Split:
    """A built-in split; ids are `<split>/<row>` (unique across splits, as a packed copy stores them)."""
    return tensor_split([f"{name}/{i}" for i in range(len(x_u8))], y, x_u8)


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

    made = [p for p in (own, *own.parents) if not p.exists()]
    writable_dir(own)
    try:
        with tempfile.TemporaryDirectory(dir=own, prefix=".download-") as tmp:
            # download_url checks the md5; the rename makes the file appear whole or not at all
            download_url(FashionMNIST.mirrors[0] + name, tmp, name, md5)
            os.replace(Path(tmp, name), own / name)
    except Exception as e:  # network down, bad archive, ...
        for folder in made:  # leave no empty folders behind in the cache
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise _missing("fashion_mnist", src, ", ".join(FMNIST_FILES), e) from None
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


def open_cifar10(data_dir: str | None, skip_bad: bool = False) -> Dataset:
    """torchvision's `cifar-10-batches-py/` under the data root, else `CIFAR10-jpg/` (ImageFolder layout,
    class folders named as CIFAR-10's classes), else downloaded into our cache."""
    import torchvision

    root = data_root(data_dir)
    norm = Normalizer(*CIFAR10_MEAN_STD)
    jpg = root / "CIFAR10-jpg"
    expected = "cifar-10-batches-py/ (torchvision) or CIFAR10-jpg/{train,test}/<class>/"
    if (root / "cifar-10-batches-py").is_dir():
        tv_root = str(root)
    elif (jpg / "train").is_dir() and (jpg / "test").is_dir():
        listing = list_files("imagefolder", str(jpg), required_classes=CIFAR10_CLASSES)
        return dataclasses.replace(open_files(listing, "cifar10", skip_bad, norm), root=str(root))
    elif offline():
        raise _missing("cifar10", root, expected)
    else:
        tv_root = str(_work_dir(root))
    made = not Path(tv_root).exists()
    try:
        if tv_root != str(root):
            writable_dir(Path(tv_root))
        tr, te = (torchvision.datasets.CIFAR10(tv_root, train=t, download=tv_root != str(root)) for t in (True, False))
    except Exception as e:
        if made:  # leave no empty folder behind in the cache
            shutil.rmtree(tv_root, ignore_errors=True)
            with contextlib.suppress(OSError):
                Path(tv_root).parent.rmdir()  # cache/extracted too, when nothing else is in it
        if isinstance(e, UserError):
            raise
        raise _missing("cifar10", root, expected, e) from None

    def split(name: str, ds: torchvision.datasets.CIFAR10) -> Split:
        return _split(name, torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))

    return Dataset("cifar10", split("train", tr), split("test", te), CIFAR10_CLASSES, norm, True, root=str(root))


def _missing(name: str, where: Path, expected: str, err: Exception | None = None) -> UserError:
    why = f" ({type(err).__name__}: {str(err).splitlines()[0][:120]})" if err else ""
    return UserError(
        f"dataset {name} not found under {where} and not downloadable{why}: put {expected} there, "
        "or point --data-dir / FM_RAY_DATA at a folder that has them"
    )
