"""The pool a labeling project works on, from the one registry (`open_source`).

The rule: a source with labels and a test split (the built-ins, an image folder, a labeled packed
pool) is sampled with the seed as `fm-ray run` samples it, so a project reproduces a run's picks
(ids: the sample's row in the train split); any other source (a folder of unlabeled images, an
unlabeled packed pool — pack once, then label) is the pool as it is, ids from the source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fm_ray.config import RunConfig
from fm_ray.data.core import Dataset
from fm_ray.data.registry import open_source, parse_spec
from fm_ray.data.settings import sample_pool
from fm_ray.data.source import ImageSource


@dataclasses.dataclass(frozen=True)
class ProjectPool:
    ids: Sequence[str]
    images: ImageSource  # uint8 (C, H, W) images, read on demand (a packed pool stays on disk)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    paths: Sequence[str] | None  # the image file of each sample, where the pool has files
    n_classes: int | None  # where the source knows its classes


def _sampled(data: Dataset) -> bool:
    return data.test is not None and data.train.labels is not None and data.test.labels is not None


def load_pool(cfg: RunConfig) -> ProjectPool:
    """The project's pool (see the module docstring)."""
    data = open_source(cfg.data.dataset, data_dir=cfg.data.data_dir, skip_bad=cfg.data.skip_bad_images)
    if not _sampled(data):
        t = data.train
        n_classes = len(data.classes) if data.classes else None
        return ProjectPool(t.ids, t.images, data.mean, data.std, data.augment, t.paths, n_classes)
    pool = sample_pool(cfg.data, data, cfg.seed)
    ids = [str(int(i)) for i in pool.train_index]  # the sample's row in the source's train split
    part = data.train.subset(pool.train_index)
    return ProjectPool(ids, part.images, data.mean, data.std, data.augment, part.paths, len(pool.classes))


def pool_ids(cfg: RunConfig) -> Sequence[str]:
    """The pool's ids; a folder's are listed without decoding its images (what checking an import needs)."""
    kind, arg = parse_spec(cfg.data.dataset)
    if kind == "folder":
        from fm_ray.data.files import list_files

        return list_files(kind, arg).splits["train"].ids
    return load_pool(cfg).ids
