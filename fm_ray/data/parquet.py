"""The packed pool format (what `fm-ray pack` writes and `--dataset parquet:<path or URI>` reads).

    <pool>/pool.json                  the manifest, written last: a pool without it is not a pool
    <pool>/train/part-00000.parquet   rows in the source's order, `ROW_GROUP` rows per row group
    <pool>/test/part-00000.parquet    (where the source has a test split)
    <pool>/skipped_images.csv         (with --skip-bad-images) the images left out, and why

Each row: `id` (unique string), `image` (raw uint8 bytes of one C x H x W image, C-major) and
`label` (int64 index into the manifest's `classes`, null when unlabeled). The row number within a
split is the sample's `dataset_index`. Any row range reads alone: a reader opens only the row
groups that hold it. Local paths or object-store URIs (s3://, gs://, file://) go through
pyarrow's filesystems.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from fm_ray.errors import UserError

FORMAT = "fm_ray-pool"
VERSION = 1
MANIFEST = "pool.json"
SKIPPED_CSV = "skipped_images.csv"
SPLITS = ("train", "test")
ROW_GROUP = 1024  # rows per Parquet row group: the unit a shard or the driver reads
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64())])


def filesystem(where: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI (s3://, gs://, file://, ...)."""
    if "://" in where:
        try:
            return pafs.FileSystem.from_uri(where)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise UserError(
                f"cannot open {where} ({str(e).splitlines()[0][:120]}): check the URI and credentials"
            ) from None
    import os

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(where))


def part_name(split: str, i: int) -> str:
    return f"{split}/part-{i:05d}.parquet"


@dataclass(frozen=True)
class SplitFiles:
    """One split's files and where each row group starts (row numbers within the split)."""

    files: tuple[str, ...]  # relative to the pool root
    group_file: np.ndarray  # (G,) file index of each row group
    group_index: np.ndarray  # (G,) row-group index within its file
    group_start: np.ndarray  # (G + 1,) first row of each group; the last entry is the split's row count

    @property
    def rows(self) -> int:
        return int(self.group_start[-1])


class ParquetImages:
    """Rows of one split of a packed pool as an `ImageSource`: position i is split row `rows[i]`.

    Small and picklable (root, split, row numbers, row-group table); it opens files only in `read`,
    and reads only the row groups that hold the asked rows. `reads` records every read position, so
    a test can check what a process (the driver) held.
    """

    def __init__(self, root: str, split: str, files: SplitFiles, shape: tuple[int, int, int], rows: np.ndarray):
        self.root, self.split, self.files, self.shape = root, split, files, shape
        self.rows = np.asarray(rows, dtype=np.int64)
        self.reads: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "reads": []}

    def subset(self, positions: np.ndarray) -> ParquetImages:
        return ParquetImages(self.root, self.split, self.files, self.shape, self.rows[np.asarray(positions)])

    def read(self, positions: np.ndarray) -> torch.Tensor:
        positions = np.asarray(positions, dtype=np.int64)
        self.reads.append(positions.copy())
        want = self.rows[positions]
        out = np.empty((len(want), *self.shape), dtype=np.uint8)
        if not len(want):
            return torch.from_numpy(out)
        fs, base = filesystem(self.root)
        group_of = np.searchsorted(self.files.group_start, want, side="right") - 1
        order = np.argsort(group_of, kind="stable")
        opened: dict[int, pq.ParquetFile] = {}
        for g in np.unique(group_of):
            sel = order[np.searchsorted(group_of[order], g) : np.searchsorted(group_of[order], g, side="right")]
            f, start = int(self.files.group_file[g]), int(self.files.group_start[g])
            name = self.files.files[f]
            try:
                if f not in opened:
                    opened = {f: pq.ParquetFile(fs.open_input_file(f"{base}/{name}"))}  # one file open at a time
                col = opened[f].read_row_group(int(self.files.group_index[g]), columns=["image"]).column(0)
                out[sel] = raw_images(pc.take(col, pa.array(want[sel] - start)).combine_chunks(), self.shape)
            except (OSError, pa.ArrowException, ValueError) as e:
                end = int(self.files.group_start[g + 1])
                raise UserError(
                    f"pool {self.root}: rows {start}-{end - 1} of {self.split} ({name}) cannot be read "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:120]}): restore the file or re-pack the pool"
                ) from None
        return torch.from_numpy(out)


def raw_images(arr: pa.Array, shape: tuple[int, int, int]) -> np.ndarray:
    """A binary column of raw C*H*W-byte images -> uint8 (N, C, H, W), without a Python object per row."""
    size = int(np.prod(shape))
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    if arr.null_count or not (np.diff(offsets) == size).all():
        raise ValueError(f"an image is not {size} bytes ({'x'.join(map(str, shape))})")
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(len(arr), *shape)


@dataclass(frozen=True)
class PackedPool:
    """An opened pool: manifest, ids and labels in memory (no pixels); `images(split)` reads on demand."""

    root: str
    manifest: dict[str, Any]
    splits: dict[str, SplitFiles]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])  # type: ignore[return-value]

    def images(self, split: str) -> ParquetImages:
        files = self.splits[split]
        return ParquetImages(self.root, split, files, self.shape, np.arange(files.rows))

    def columns(self, split: str) -> pa.Table:
        """`id` and `label` of every row of a split (the image column is never read here)."""
        return self._columns[split]

    @cached_property
    def _columns(self) -> dict[str, pa.Table]:
        fs, base = filesystem(self.root)
        out = {}
        for split, files in self.splits.items():
            parts = []
            for name in files.files:
                try:
                    parts.append(pq.read_table(f"{base}/{name}", columns=["id", "label"], filesystem=fs))
                except (OSError, pa.ArrowException) as e:
                    raise UserError(
                        f"pool {self.root}: {name} cannot be read ({str(e).splitlines()[0][:120]}): "
                        "restore the file or re-pack the pool"
                    ) from None
            out[split] = pa.concat_tables(parts) if parts else SCHEMA.empty_table().select(["id", "label"])
        _check_unique_ids(self.root, out)
        return out


def _check_unique_ids(root: str, tables: dict[str, pa.Table]) -> None:
    ids = pa.chunked_array([t.column("id") for t in tables.values()], type=pa.string())
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")[0].as_py()
    raise UserError(f"pool {root} has the id {dup!r} more than once: ids must be unique; fix the source and re-pack")


def open_pool(where: str) -> PackedPool:
    """Open a packed pool (path or URI); checks the manifest and every file's footer, reads no pixels."""
    fs, base = filesystem(where)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"pool {where} does not exist: create it with `fm-ray pack SOURCE {where}`")
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):
        raise UserError(
            f"{where} is not an fm_ray pool (no readable {MANIFEST}; an interrupted pack writes none): "
            f"run or finish `fm-ray pack SOURCE {where}`"
        ) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise UserError(f"{where}/{MANIFEST} is not an fm_ray pool manifest (format {FORMAT} v{VERSION}): re-pack it")
    splits = {}
    for split, entry in manifest["splits"].items():
        groups: list[tuple[int, int, int]] = []
        start = 0
        for f, (name, rows) in enumerate(zip(entry["files"], entry["file_rows"], strict=True)):
            try:
                meta = pq.read_metadata(fs.open_input_file(f"{base}/{name}"))
            except (OSError, pa.ArrowException):
                raise UserError(
                    f"pool {where}: {name} is missing or unreadable: restore it or re-pack the pool"
                ) from None
            if meta.num_rows != rows or meta.schema.to_arrow_schema().names != SCHEMA.names:
                raise UserError(
                    f"pool {where}: {name} holds {meta.num_rows} rows, the manifest says {rows}: "
                    "it was changed after packing; re-pack the pool"
                )
            for g in range(meta.num_row_groups):
                groups.append((f, g, start))
                start += meta.row_group(g).num_rows
        table = np.array(groups, dtype=np.int64).reshape(-1, 3)
        splits[split] = SplitFiles(
            tuple(entry["files"]), table[:, 0], table[:, 1], np.append(table[:, 2], start).astype(np.int64)
        )
    return PackedPool(where, manifest, splits)
