"""The one record every data source opens to (`Dataset`), and the rules every source shares: the
channel statistics, the image-size check and the list of images --skip-bad-images dropped.

`fm_ray.data.registry.open_source(spec)` returns a `Dataset` for every spec (`fashion_mnist`,
`cifar10`, `imagefolder:`, `folder:`, `csv:`, `parquet:`); `fm-ray run`, `fm-ray pack`, projects,
`fm_ray.select` and the shards all read it.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fm_ray.data.normalize import Normalizer
from fm_ray.data.source import ImageSource, TensorImages, read_all
from fm_ray.errors import UserError

SKIPPED_IMAGES_CSV = "skipped_images.csv"
SKIPPED_HEADER = ("file", "reason")
# A channel whose pixels are all equal has std 0: dividing by it makes every input NaN. Its std is
# floored at one grey level (1/255), so the channel feeds zeros (x - mean = 0) instead; docs/method.md.
STD_FLOOR = 1 / 255


@dataclass(frozen=True)
class Split:
    """One split of a dataset: row i is `ids[i]`, `labels[i]` (or unlabeled), `images` position i."""

    ids: Sequence[str]  # unique within the dataset
    labels: torch.Tensor | None  # int64 (N,) indices into `Dataset.classes`; None: unlabeled
    images: ImageSource  # uint8 (C, H, W) per row, read on demand (a packed pool stays on disk)
    paths: Sequence[str] | None = None  # the image file of each row, where the source has files

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: np.ndarray) -> Split:
        rows = np.asarray(rows, dtype=np.int64)
        return Split(
            [self.ids[i] for i in rows],
            None if self.labels is None else self.labels[torch.from_numpy(rows)],
            self.images.subset(rows),
            None if self.paths is None else [self.paths[i] for i in rows],
        )


@dataclass(frozen=True)
class Dataset:
    """An opened data source: its splits, class names, normalization and augmentation."""

    name: str  # the spec it was opened from
    train: Split
    test: Split | None  # None: the source has no test split (a folder of unlabeled images)
    classes: tuple[str, ...] | None  # label i is classes[i]; None: the source names no classes
    norm: Normalizer
    augment: bool  # RandomCrop(pad 4) + horizontal flip while training (the paper's CIFAR-10 recipe)
    skipped_images: tuple[tuple[str, str], ...] = ()  # (file, why) dropped by --skip-bad-images
    root: str | None = None  # the folder (or file) the source reads; fm_ray never writes inside it

    @property
    def mean(self) -> tuple[float, ...]:
        return self.norm.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.norm.std

    def labels(self, split: str) -> torch.Tensor:
        """A split's labels; a clear error where the source has no such split or leaves rows unlabeled."""
        part = self.train if split == "train" else self.test
        if part is None:
            raise UserError(f"{self.name} has no test split to evaluate on: give a source with test images")
        if part.labels is None:
            raise UserError(
                f"{self.name} has unlabeled {split} rows: active learning runs need every label; "
                "give a labeled source (imagefolder:, csv: with a label column), or label it as a project"
            )
        return part.labels

    # in-RAM conveniences (tests, benchmarks, packing a built-in): the whole split as one tensor
    @property
    def train_x(self) -> torch.Tensor:
        return read_all(self.train.images)

    @property
    def train_y(self) -> torch.Tensor:
        return self.labels("train")

    @property
    def test_x(self) -> torch.Tensor:
        if self.test is None:
            self.labels("test")  # raises the clear error
        assert self.test is not None
        return read_all(self.test.images)

    @property
    def test_y(self) -> torch.Tensor:
        return self.labels("test")


def tensor_split(ids: Sequence[str], labels: torch.Tensor | None, x_u8: torch.Tensor, paths=None) -> Split:
    return Split(ids, labels, TensorImages(x_u8), paths)


# -- channel statistics: exact integer sums, so they do not depend on how rows are cut or ordered ---
def pixel_sums(x_N_C_H_W: np.ndarray | torch.Tensor) -> tuple[list[int], list[int], int]:
    """Per channel: sum and sum of squares of the uint8 values (exact, from value histograms), and
    the number of pixels per channel."""
    x = x_N_C_H_W.numpy() if isinstance(x_N_C_H_W, torch.Tensor) else x_N_C_H_W
    if not len(x):
        return [], [], 0
    values = np.arange(256, dtype=np.int64)
    hist = [np.bincount(x[:, c].ravel(), minlength=256) for c in range(x.shape[1])]
    return [int(h @ values) for h in hist], [int(h @ values**2) for h in hist], int(x[:, 0].size)


def mean_std(sums: Sequence[int], sumsqs: Sequence[int], n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Channel mean and (unbiased) std of pixels / 255 from exact integer sums; std floored at
    `STD_FLOOR` (a constant channel would divide by zero)."""
    if n <= 0:
        raise UserError("no pixels to compute the normalization from: the train split is empty")
    mean = tuple(s / n / 255 for s in sums)
    var = [max((q - s * s / n) / max(n - 1, 1), 0.0) for s, q in zip(sums, sumsqs, strict=True)]
    std = tuple(max(math.sqrt(v) / 255, STD_FLOOR) for v in var)
    return mean, std


def sums_mean_std(records: Sequence[dict], channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`mean_std` of the pixels of several packed files, from the exact integer sums each one's
    footer records (`pixel_sum`, `pixel_sumsq`, `pixels_per_channel`)."""
    s, q, n = [0] * channels, [0] * channels, 0
    for m in records:
        if m["pixel_sum"]:
            s = [a + b for a, b in zip(s, m["pixel_sum"], strict=True)]
            q = [a + b for a, b in zip(q, m["pixel_sumsq"], strict=True)]
            n += m["pixels_per_channel"]
    return mean_std(s, q, n)


def channel_stats(x_N_C_H_W: np.ndarray | torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return mean_std(*pixel_sums(x_N_C_H_W))


# -- one image size -----------------------------------------------------------------------------
def hw(shape: Sequence[int]) -> str:
    return f"{shape[-2]}x{shape[-1]}" + (f" with {shape[0]} channels" if len(shape) == 3 else "")


def _hw2(shape: Sequence[int]) -> str:
    return f"{shape[-2]}x{shape[-1]}"


def size_mismatch(first: str, first_shape: Sequence[int], other: str, other_shape: Sequence[int]) -> UserError:
    """The one message for two images of different sizes (channels named only where they differ)."""
    show = hw if len(first_shape) == 3 and len(other_shape) == 3 and first_shape[0] != other_shape[0] else _hw2
    return UserError(
        f"images differ in size: {first} is {show(first_shape)}, {other} is {show(other_shape)}: "
        "resize them to one size (fm-ray pack --resize N packs them at one size)"
    )


def check_square(name: str, shape: Sequence[int], example: str) -> None:
    """The models and the random crop assume square images."""
    if shape[-2] != shape[-1]:
        raise UserError(
            f"{name}: images are {shape[-2]}x{shape[-1]} (e.g. {example}), not square: "
            "crop or resize them to square (fm-ray pack --resize N)"
        )


# -- the images --skip-bad-images dropped: one format everywhere -------------------------------
def skipped_csv(skipped: Sequence[tuple[str, str]]) -> bytes:
    """`skipped_images.csv`: a header `file,reason`, then one row per image dropped."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(SKIPPED_HEADER)
    writer.writerows(skipped)
    return text.getvalue().encode()


def write_skipped_images(run_dir: Path, data: Dataset) -> None:
    """List the images --skip-bad-images dropped as run_dir/skipped_images.csv; remove a list left by
    an earlier run in the same folder when none were dropped."""
    from fm_ray._internal.files import write_atomically
    from fm_ray._internal.log import log

    path = run_dir / SKIPPED_IMAGES_CSV
    if not data.skipped_images:
        path.unlink(missing_ok=True)
        return
    body = skipped_csv(data.skipped_images)
    write_atomically(path, lambda f: f.write(body))
    log(f"skipped {len(data.skipped_images)} images that cannot be decoded: listed in {path}")
