"""Pools given by name (`folder:`, `parquet:`, `imagefolder:`, the built-ins) for projects and `fm_ray.select`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from fm_ray.config import DataConfig, RunConfig
from fm_ray.data.builtin import load_dataset, load_pool_data
from fm_ray.data.normalize import Normalizer
from fm_ray.data.settings import sample_pool
from fm_ray.data.source import ImageSource, TensorImages
from fm_ray.errors import UserError


@dataclasses.dataclass
class ProjectPool:
    ids: list[str]
    images: ImageSource  # uint8 (C, H, W) images, read on demand (a packed pool stays on disk)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    paths: list[str] | None  # the image file of each sample, where the pool has files
    n_classes: int | None  # where the source knows its classes


def load_pool(cfg: RunConfig) -> ProjectPool:
    """The project's pool: a folder of unlabeled images, or a dataset sampled as `fm-ray run` does."""
    source = cfg.data.dataset
    if source.startswith("folder:"):
        return _folder(Path(source.split(":", 1)[1]).expanduser())
    data = load_pool_data(cfg.data)
    pool = sample_pool(cfg.data, data, cfg.seed)
    ids = [str(int(i)) for i in pool.train_index]  # the sample's row in the source's train split
    images = data.train.subset(pool.train_index)
    return ProjectPool(ids, images, data.mean, data.std, data.augment, None, len(pool.classes))


def _image_files(root: Path) -> list[Path]:
    from fm_ray.data.decode import IMAGE_SUFFIXES

    if not root.is_dir():
        raise UserError(f"folder {root} does not exist: give folder:<a folder of images>")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise UserError(f"folder {root} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}): add images")
    return files


def pool_ids(cfg: RunConfig) -> list[str]:
    """The pool's ids without decoding a folder's images (what checking an import needs)."""
    source = cfg.data.dataset
    if source.startswith("folder:"):
        root = Path(source.split(":", 1)[1]).expanduser()
        return [p.relative_to(root).as_posix() for p in _image_files(root)]
    return load_pool(cfg).ids


def _folder(root: Path) -> ProjectPool:
    from fm_ray.data.decode import decode_image_file

    files = _image_files(root)
    images = [decode_image_file(p) for p in files]
    shapes = {tuple(im.shape): p for im, p in zip(images, files, strict=True)}
    if len(shapes) > 1:
        (s1, f1), (s2, f2) = list(shapes.items())[:2]
        raise UserError(f"images differ in size ({f1}: {s1}, {f2}: {s2}): resize them to one size first")
    x = torch.stack(images)
    scaled = x.float().div_(255)
    mean = tuple(float(v) for v in scaled.mean((0, 2, 3)))
    std = tuple(float(v) for v in scaled.std((0, 2, 3)))
    ids = [p.relative_to(root).as_posix() for p in files]
    return ProjectPool(ids, TensorImages(x), mean, std, False, [str(p.resolve()) for p in files], None)


@dataclasses.dataclass(frozen=True)
class NamedPool:
    """A pool given by name: its ids, its images (read on demand) and their normalization."""

    ids: list[Any]
    images: ImageSource
    norm: Normalizer


def open_named_pool(source: str) -> NamedPool:
    """`parquet:<pool>` (a packed pool's train split, labeled or not), `folder:<path>` (images,
    recursive; ids are relative paths) or `imagefolder:<path>` (its train/ split; ids are indices)."""
    if source.startswith("parquet:"):
        from fm_ray.data.parquet import open_pool

        packed = open_pool(source.split(":", 1)[1])
        ids = packed.columns("train").column("id").to_pylist()
        m = packed.manifest
        return NamedPool(ids, packed.images("train"), Normalizer(tuple(m["mean"]), tuple(m["std"])))
    if source.startswith("folder:"):
        pool = load_pool(RunConfig(data=DataConfig(dataset=source)))
        return NamedPool(list(pool.ids), pool.images, Normalizer(pool.mean, pool.std))
    if source.startswith("imagefolder:"):
        data = load_dataset(DataConfig(dataset=source))
        return NamedPool(list(range(len(data.train_x))), TensorImages(data.train_x), Normalizer(data.mean, data.std))
    raise UserError(f"pool {source!r}: give parquet:<pool>, folder:<path>, imagefolder:<path>, a Dataset or a tensor")
