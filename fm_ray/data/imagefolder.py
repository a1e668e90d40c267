"""ImageFolder datasets (`<root>/{train,test}/<class>/<image>`): class names, decoding, decoded cache.

Label i is the i-th class folder name in sorted order, in each split separately, so both splits must
hold the same class names or test images are scored against another class's index. The decoded
cache is keyed by a hash of every file's name and bytes: a replaced image is decoded again whatever
its timestamps say, and reading ~60,000 small files costs about a second, a tenth of decoding them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fm_ray._internal.files import writable_dir, write_atomically
from fm_ray._internal.log import log, progress
from fm_ray.data.decode import BadImage, decode_image_bytes
from fm_ray.errors import UserError

CACHE_VERSION = 2  # part of the key: bump it when decoding changes


@dataclass(frozen=True)
class Split:
    """One decoded split: rows of `x` are the files in `files`, in torchvision ImageFolder's order."""

    x: torch.Tensor  # uint8 (N, 3, H, W)
    y: torch.Tensor  # int64 (N,) index into the sorted class names
    files: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]  # (file, why) of the images --skip-bad-images dropped


def load_splits(
    root: Path, cache: Path, skip_bad: bool, required: tuple[str, ...] | None = None
) -> tuple[Split, Split, tuple[str, ...]]:
    """Decode root/train and root/test (through the cache folder); returns them and the class names,
    which must be `required` when given."""
    train_classes, test_classes = class_names(root / "train"), class_names(root / "test")
    check_classes(root, train_classes, test_classes)
    if required is not None and tuple(train_classes) != required:
        raise UserError(
            f"{root} has classes {_names(train_classes)}, not {list(required)}: name the class folders like that"
        )
    train = decode_split(root / "train", train_classes, cache, skip_bad)
    test = decode_split(root / "test", test_classes, cache, skip_bad)
    check_sizes(train, test)
    return train, test, tuple(train_classes)


def class_names(split: Path) -> list[str]:
    """A split's class folders, sorted; hidden folders (.ipynb_checkpoints, ...) are not classes."""
    return sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))


def check_classes(root: Path, train: list[str], test: list[str]) -> None:
    if len(train) < 2:
        raise UserError(
            f"imagefolder {root}: train/ has {len(train)} class folder(s) {train}: "
            "a classifier needs at least 2, one sub-folder per class"
        )
    if train != test:
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise UserError(
            f"imagefolder {root}: train/ classes {_names(train)} and test/ classes {_names(test)} differ "
            f"(only in train: {only_train}, only in test: {only_test}): give both splits the same class folders"
        )


def _names(names: list[str], most: int = 20) -> str:
    return str(names) if len(names) <= most else f"{names[:most]} ... ({len(names)} in all)"


def list_files(split: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(file, class index) in torchvision ImageFolder's order. Every non-hidden file counts, whatever
    its suffix: a file that is not an image is reported, never silently left out. Paths are strings:
    pathlib would cost seconds on 60,000 files."""
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        walked = []
        for folder, dirs, files in os.walk(split / name, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            walked.append((folder, sorted(f for f in files if not f.startswith("."))))
        found = [(os.path.join(folder, f), label) for folder, files in sorted(walked) for f in files]
        if not found:
            raise UserError(f"class folder {split / name} holds no files: add its images or delete the folder")
        samples += found
    return samples


def decode_split(split: Path, classes: list[str], cache: Path, skip_bad: bool) -> Split:
    samples = list_files(split, classes)
    encoded = [_read(path) for path, _ in samples]  # bytes, or why the file is unreadable
    # <split name>-<folder hash>-<contents hash>.pt: one entry per folder, the older ones removed
    folder = f"{split.name}-{hashlib.blake2b(str(split.resolve()).encode(), digest_size=6).hexdigest()}"
    key = hashlib.blake2b(f"v{CACHE_VERSION}".encode(), digest_size=16)
    skip = len(str(split)) + 1
    for (path, label), data in zip(samples, encoded, strict=True):
        key.update(repr((path[skip:], label, len(data), isinstance(data, str))).encode())
        key.update(data.encode() if isinstance(data, str) else data)
    cached = cache / f"{folder}-{key.hexdigest()}.pt"
    found = _load(cached)
    if found is None:
        writable_dir(cache)  # fail before the long decode, not after it
        found = _decode(split, samples, encoded, skip_bad)
        blob = {
            "x": found.x,
            "y": found.y,
            "files": "\n".join(found.files),
            "skipped": [list(s) for s in found.skipped],
        }
        write_atomically(cached, lambda f: torch.save(blob, f))
        for older in cache.glob(f"{folder}-*.pt"):  # decodes of files since replaced
            if older != cached:
                older.unlink(missing_ok=True)
    if found.skipped and not skip_bad:  # cached by a run with --skip-bad-images
        raise BadImage(*found.skipped[0])
    return found


def _read(path: str) -> bytes | str:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or type(e).__name__}"


def _decode(split: Path, samples: list[tuple[str, int]], encoded: list[bytes | str], skip_bad: bool) -> Split:
    log(f"decoding {len(samples)} images under {split} (cached for the next run)")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    for (path, label), data in progress(zip(samples, encoded, strict=True), f"decoding {split.name}", len(samples)):
        try:
            if isinstance(data, str):
                raise BadImage(path, data)
            image = decode_image_bytes(data, path, channels=3)
        except BadImage as e:
            if not skip_bad:
                raise
            skipped.append((e.name, e.why))
            continue
        if images and image.shape != images[0].shape:
            raise UserError(
                f"images differ in size: {files[0]} is {_hw(images[0])}, {path} is {_hw(image)}: "
                "resize all images to one size"
            )
        images.append(image)
        labels.append(label)
        files.append(path)
    if not images:
        raise UserError(f"no image under {split} could be decoded ({len(skipped)} bad): replace them")
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.long), tuple(files), tuple(skipped))


def _load(path: Path) -> Split | None:
    """The cached split, or None when absent or unreadable (a damaged cache file is decoded again)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        files = tuple(blob["files"].split("\n")) if blob["files"] else ()  # one string: unpickles fast
        found = Split(blob["x"], blob["y"], files, tuple((f, w) for f, w in blob["skipped"]))
        ok = found.x.dtype == torch.uint8 and found.x.dim() == 4 and len(found.x) == len(found.y) == len(found.files)
    except Exception as e:  # torch.load reports damage as any of several types
        log(f"decoded cache {path} is unreadable ({type(e).__name__}): decoding again")
        return None
    if not ok:
        log(f"decoded cache {path} has the wrong shape: decoding again")
        return None
    return found


def check_sizes(train: Split, test: Split) -> None:
    """One image size for both splits, and square: the models and the random crop assume H == W."""
    if train.x.shape[1:] != test.x.shape[1:]:
        raise UserError(
            f"images differ in size: {train.files[0]} is {_hw(train.x[0])}, {test.files[0]} is {_hw(test.x[0])}: "
            "resize all images (train and test) to one size"
        )
    height, width = train.x.shape[-2:]
    if height != width:
        raise UserError(
            f"images are {height}x{width} (e.g. {train.files[0]}), not square: crop or resize them to square"
        )


def _hw(image: torch.Tensor) -> str:
    return f"{image.shape[-2]}x{image.shape[-1]}"
