"""The one data-source registry: `open_source(spec)` for every dataset fm_ray reads.

    fashion_mnist | cifar10              the built-ins (data root: --data-dir, $FM_RAY_DATA, the cache)
    imagefolder:<root>                   <root>/{train,test}/<class>/<image>
    folder:<root>                        unlabeled images, recursive (ids: relative paths)
    csv:<file>                           a `path` column, optional `label` and `split` columns
    parquet:<path or URI>                a pool written by `fm-ray pack` (s3://, gs://, file://, local)

`fm-ray run`, `fm-ray pack`, labeling projects and `fm_ray.select` all open their data here and get
the same `Dataset` record; a new source is one opener in `SOURCES`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fm_ray.config import DataConfig
from fm_ray.data import builtin, files
from fm_ray.data.core import Dataset, Split
from fm_ray.data.normalize import Normalizer
from fm_ray.errors import UserError

Opener = Callable[[str, str | None, bool], Dataset]  # (argument after the colon, data dir, skip bad images)


def _parquet(where: str, data_dir: str | None, skip_bad: bool) -> Dataset:
    from fm_ray.data.parquet import LazyIds, open_pool

    pool = open_pool(where)
    m = pool.manifest
    classes = tuple(m["classes"]) if m.get("classes") else None
    splits: dict[str, Split] = {}
    for name in pool.splits:
        label = pool.labels(name)
        if label.null_count == len(label):
            labels = None
        elif label.null_count:
            raise UserError(
                f"pool {where} has {label.null_count} unlabeled {name} rows of {len(label)}: a pool is labeled "
                "throughout or not at all; re-pack a source that labels every image (or none)"
            )
        else:
            labels = torch.from_numpy(label.to_numpy().astype(np.int64))
        splits[name] = Split(LazyIds(pool, name), labels, pool.images(name))
    norm = Normalizer(tuple(m["mean"]), tuple(m["std"]))
    return Dataset(
        f"parquet:{where}", splits["train"], splits.get("test"), classes, norm, bool(m["augment"]), root=None
    )


def _files(kind: str) -> Opener:
    def open_(arg: str, data_dir: str | None, skip_bad: bool) -> Dataset:
        return files.open_files(files.list_files(kind, arg), f"{kind}:{arg}", skip_bad)

    return open_


SOURCES: dict[str, Opener] = {
    "fashion_mnist": lambda arg, data_dir, skip_bad: builtin.open_fashion_mnist(data_dir),
    "cifar10": lambda arg, data_dir, skip_bad: builtin.open_cifar10(data_dir, skip_bad),
    "imagefolder": _files("imagefolder"),
    "folder": _files("folder"),
    "csv": _files("csv"),
    "parquet": _parquet,
}
SPECS = ("fashion_mnist", "cifar10", "imagefolder:<path>", "folder:<path>", "csv:<file>", "parquet:<path or URI>")


def parse_spec(spec: str) -> tuple[str, str]:
    """`kind:arg` -> (kind, arg); a built-in takes no argument, every other kind needs one."""
    kind, colon, arg = spec.partition(":")
    builtin_kind = kind in ("fashion_mnist", "cifar10")
    if kind not in SOURCES or (builtin_kind and colon) or (not builtin_kind and not arg):
        raise UserError(f"unknown dataset {spec!r}: choose one of {', '.join(SPECS)}")
    return kind, arg


def open_source(spec: str | DataConfig, *, data_dir: str | None = None, skip_bad: bool = False) -> Dataset:
    """Open a data source by spec (see the module docstring), or a run's `DataConfig` (its dataset,
    data_dir and skip_bad_images): ids, labels, classes, normalization and images read by rows. Bad
    input is a one-line `UserError`."""
    if isinstance(spec, DataConfig):
        text, data_dir, skip_bad = spec.dataset, spec.data_dir, spec.skip_bad_images
    else:
        text = spec
    kind, arg = parse_spec(text)
    return SOURCES[kind](arg, data_dir, skip_bad)


def source_root(spec: str, data_dir: str | None = None) -> Path | None:
    """The local folder a spec reads (None for object stores), without opening it: fm_ray never
    writes inside it (a run directory there would become part of the data)."""
    kind, arg = parse_spec(spec)
    if kind in ("fashion_mnist", "cifar10"):
        return builtin.data_root(data_dir).resolve()
    if kind == "parquet":
        return None if "://" in arg and not arg.startswith("file://") else Path(arg.removeprefix("file://")).resolve()
    # a CSV lists its images: writing beside it changes nothing, only the file itself is data
    return Path(arg).expanduser().resolve()


def check_outside(out: str | Path, spec: str, data_dir: str | None, what: str) -> None:
    """Refuse to write `out` inside the data it reads (an image folder would gain a class, a folder
    new images)."""
    root = source_root(spec, data_dir)
    if root is None or "://" in str(out):
        return
    target = Path(out).expanduser().resolve()
    if target == root or root in target.parents:
        raise UserError(
            f"{what} {out} is inside the data folder {root}: fm_ray never writes into its data; "
            "choose a folder outside it"
        )
