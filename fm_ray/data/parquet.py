"""The packed pool format (what `fm-ray pack` writes and `--dataset parquet:<path or URI>` reads).

    <pool>/pool.json                  the manifest, written last: a pool without it is not a pool
    <pool>/train/part-00000.parquet   rows in the source's order, `ROW_GROUP` rows per row group
    <pool>/test/part-00000.parquet    (where the source has a test split)
    <pool>/listing.parquet            the source's items as packed: split, id, label, bytes, sha256
    <pool>/skipped_images.csv         (with --skip-bad-images) the images left out, and why

Each row: `id` (unique string), `image` (raw uint8 bytes of one C x H x W image, C-major) and
`label` (int64 index into the manifest's `classes`, null when unlabeled). The row number within a
split is the sample's `dataset_index`. Any row range reads alone: a reader opens only the row
groups that hold it. Local paths or object-store URIs (s3://, gs://, file://) go through
pyarrow's filesystems.

pool.json's `listing` names that file, counts its items per split and carries `sha256`: one digest
over the digests of the items each part file holds (not of listing.parquet's bytes), which a re-run
of the pack compares with the source as it is now.

Nothing in the manifest is trusted alone, and nothing is read whole only to hash it (format v3):
- each part file's footer carries what it was packed with (shape, classes, augmentation, the
  source's normalization or the exact pixel sums it is computed from, and the digests below), and
  `open_pool` checks pool.json's every field against the footers, reading footers only;
- `group_sha256`: one sha256 per row group of the raw image bytes it holds. Every read of a row
  group (a shard's pass, the driver's labeled rows) is checked against it as it is decoded, so a
  file changed, swapped or corrupted after packing, even while a run reads it, is refused by the
  process that reads it;
- `ids_sha256`, `labels_sha256`: one sha256 per file of its ids, and of its labels, checked as
  they are read. A run's driver reads the labels only (and the test split): never a pixel of the
  unlabeled pool, nor its ids.
`READ_BYTES` counts what this process read from pool files (column chunks, footers), by kind.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from fm_ray.data.core import sums_mean_std
from fm_ray.errors import UserError

FORMAT = "fm_ray-pool"
VERSION = 3  # 3: per-row-group image digests, per-file id/label digests, every field in the footers
# 2: per-file sha256 (a whole-file read to check it); 1: no digests. Both are packed again.
MANIFEST = "pool.json"
LISTING = "listing.parquet"
SKIPPED_CSV = "skipped_images.csv"
SPLITS = ("train", "test")
ROW_GROUP = 1024  # rows per Parquet row group: the unit a shard or the driver reads
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64())])
LISTING_SCHEMA = pa.schema(
    [("split", pa.string()), ("id", pa.string()), ("label", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())]
)
FILE_META = b"fm_ray"  # per-file Parquet schema metadata: what the file was packed with (see the module doc)
READ_BYTES: Counter[str] = Counter()  # bytes this process read from pool files: image, id, label, footer


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
    ids_sha256: tuple[str, ...]  # of each file's ids (`ids_digest`), from pool.json
    labels_sha256: tuple[str, ...]  # of each file's labels (`labels_digest`), from pool.json
    group_sha256: tuple[str, ...]  # (G,) of each row group's raw image bytes (`image_digest`), from pool.json
    group_file: np.ndarray  # (G,) file index of each row group
    group_index: np.ndarray  # (G,) row-group index within its file
    group_start: np.ndarray  # (G + 1,) first row of each group; the last entry is the split's row count

    @property
    def rows(self) -> int:
        return int(self.group_start[-1])


# -- digests: what was packed, checked as it is read ------------------------------------------------
def image_digest(data: Any) -> str:
    """sha256 of a row group's images: their raw C*H*W bytes, row after row (any buffer)."""
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def ids_digest(ids: pa.Array | pa.ChunkedArray) -> str:
    """sha256 of a file's ids: each id's length and UTF-8 bytes."""
    ids = pa.chunked_array([ids]) if isinstance(ids, pa.Array) else ids
    ids = ids.combine_chunks() if ids.num_chunks else pa.array([], pa.string())
    h = hashlib.sha256(pc.binary_length(ids).fill_null(-1).to_numpy(zero_copy_only=False).astype("<i8").tobytes())
    if len(ids):
        offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32)[ids.offset : ids.offset + len(ids) + 1]
        h.update(memoryview(ids.buffers()[2])[offsets[0] : offsets[-1]])
    return h.hexdigest()


def labels_digest(labels: pa.Array | pa.ChunkedArray) -> str:
    """sha256 of a file's labels, each as int64 (null: -1)."""
    return hashlib.sha256(pc.fill_null(labels, -1).to_numpy(zero_copy_only=False).astype("<i8").tobytes()).hexdigest()


def _changed(root: str, name: str, what: str) -> UserError:
    return UserError(
        f"pool {root}: {name} is not the file that was packed ({what} differ from pool.json's): "
        "restore it or re-pack the pool"
    )


class ParquetImages:
    """Rows of one split of a packed pool as an `ImageSource`: position i is split row `rows[i]`.

    Small and picklable (root, split, row numbers, row-group table); it opens files only in `read`,
    reads only the row groups that hold the asked rows, checks each against its digest as it is
    decoded, and keeps at most one decoded row group (and one open file) between reads, so a pass
    over sorted rows decodes each row group once.
    """

    def __init__(self, root: str, split: str, files: SplitFiles, shape: tuple[int, int, int], rows: np.ndarray):
        self.root, self.split, self.files, self.shape = root, split, files, shape
        self.rows = np.asarray(rows, dtype=np.int64)
        self._open: tuple[int, pq.ParquetFile] | None = None  # (file index, the file), one at a time
        self._group: tuple[int, np.ndarray] | None = None  # (row group, its images), one at a time

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": None, "_group": None}

    def subset(self, positions: np.ndarray) -> ParquetImages:
        return ParquetImages(self.root, self.split, self.files, self.shape, self.rows[np.asarray(positions)])

    def read(self, positions: np.ndarray) -> torch.Tensor:
        positions = np.asarray(positions, dtype=np.int64)
        want = self.rows[positions]
        out = np.empty((len(want), *self.shape), dtype=np.uint8)
        group_of = np.searchsorted(self.files.group_start, want, side="right") - 1
        for g in dict.fromkeys(group_of.tolist()):  # in order of first use: a sorted pass reads each once
            sel = group_of == g
            out[sel] = self._decoded(g)[want[sel] - self.files.group_start[g]]
        return torch.from_numpy(out)

    def close(self) -> None:
        """Drop the open file and the decoded row group (a pass is over)."""
        self._open, self._group = None, None

    def _decoded(self, g: int) -> np.ndarray:
        """Row group `g`'s images, read and checked against its digest (or the one held)."""
        if self._group is not None and self._group[0] == g:
            return self._group[1]
        self._group = None  # at most one decoded row group: the old one goes first
        f, start = int(self.files.group_file[g]), int(self.files.group_start[g])
        name = self.files.files[f]
        try:
            if self._open is None or self._open[0] != f:
                self._open = None
                fs, base = filesystem(self.root)
                self._open = (f, pq.ParquetFile(fs.open_input_file(f"{base}/{name}")))
            file = self._open[1]
            index = int(self.files.group_index[g])
            READ_BYTES["image"] += file.metadata.row_group(index).column(1).total_compressed_size
            col = file.read_row_group(index, columns=["image"]).column(0).combine_chunks()
            images = raw_images(col, self.shape)
        except (OSError, pa.ArrowException, ValueError) as e:
            end = int(self.files.group_start[g + 1])
            raise UserError(
                f"pool {self.root}: rows {start}-{end - 1} of {self.split} ({name}) cannot be read "
                f"({type(e).__name__}: {str(e).splitlines()[0][:120]}): restore the file or re-pack the pool"
            ) from None
        if image_digest(images) != self.files.group_sha256[g]:
            self._open = None  # the next read opens the file by its name again
            end = int(self.files.group_start[g + 1])
            raise _changed(self.root, name, f"the images of rows {start}-{end - 1} of {self.split}")
        self._group = (g, images)
        return images


def raw_images(arr: pa.Array, shape: tuple[int, int, int]) -> np.ndarray:
    """A binary column of raw C*H*W-byte images -> uint8 (N, C, H, W), without a Python object per row."""
    size = int(np.prod(shape))
    if not len(arr):
        return np.empty((0, *shape), dtype=np.uint8)
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
        """`id` and `label` of every row of a split, each checked against pool.json's digests and
        the ids for uniqueness over all splits (the image column is never read here)."""
        return pa.table({"id": self._ids[split], "label": self.labels(split)})

    def labels(self, split: str) -> pa.ChunkedArray:
        """The `label` column of a split, checked (all a run's driver reads of the train split)."""
        return self._labels[split]

    @cached_property
    def _labels(self) -> dict[str, pa.ChunkedArray]:
        out = {}
        for split, files in self.splits.items():
            column = self._read_column(files, "label", files.labels_sha256, labels_digest)
            for name, chunk in zip(files.files, column.chunks, strict=True):
                _check_labels(self.root, name, chunk, self.manifest["classes"])
            out[split] = column
        return out

    @cached_property
    def _ids(self) -> dict[str, pa.ChunkedArray]:
        out = {split: self._read_column(f, "id", f.ids_sha256, ids_digest) for split, f in self.splits.items()}
        _check_unique_ids(self.root, out)
        return out

    def _read_column(
        self, files: SplitFiles, column: str, digests: tuple[str, ...], digest: Callable[[pa.ChunkedArray], str]
    ) -> pa.ChunkedArray:
        """One column of every file of a split (one chunk a file), each checked against its digest."""
        fs, base = filesystem(self.root)
        index = SCHEMA.get_field_index(column)
        chunks = []
        for name, expected in zip(files.files, digests, strict=True):
            try:
                file = pq.ParquetFile(fs.open_input_file(f"{base}/{name}"))
                meta = file.metadata
                sizes = (meta.row_group(g).column(index).total_compressed_size for g in range(meta.num_row_groups))
                READ_BYTES[column] += sum(sizes)
                values = file.read(columns=[column]).column(0)
            except (OSError, pa.ArrowException) as e:
                raise UserError(
                    f"pool {self.root}: {name} cannot be read ({str(e).splitlines()[0][:120]}): "
                    "restore the file or re-pack the pool"
                ) from None
            if digest(values) != expected:
                raise _changed(self.root, name, f"its {column}s")
            chunks.append(values.combine_chunks() if values.num_chunks else pa.array([], SCHEMA.field(column).type))
        return pa.chunked_array(chunks, type=SCHEMA.field(column).type)


class LazyIds(Sequence[str]):
    """A split's ids, read (and checked) on first use: a run's driver never reads them, and a pool
    of millions holds them as one Arrow column, not a Python string per row."""

    def __init__(self, pool: PackedPool, split: str):
        self.pool, self.split = pool, split

    def __len__(self) -> int:
        return self.pool.splits[self.split].rows

    @cached_property
    def _column(self) -> pa.Array:
        column = self.pool._ids[self.split]
        return column.combine_chunks() if column.num_chunks else pa.array([], pa.string())

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self._column[i].to_pylist()
        return self._column[int(i)].as_py()

    def __iter__(self) -> Any:
        for start in range(0, len(self), 65536):
            yield from self._column[start : start + 65536].to_pylist()


def _check_unique_ids(root: str, columns: dict[str, pa.ChunkedArray]) -> None:
    ids = pa.chunked_array([c for column in columns.values() for c in column.chunks], type=pa.string())
    if pc.count_distinct(ids).as_py() == len(ids):
        return
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")[0].as_py()
    raise UserError(f"pool {root} has the id {dup!r} more than once: ids must be unique; fix the source and re-pack")


def _check_labels(root: str, name: str, labels: pa.Array, classes: list[str] | None) -> None:
    if classes is None:
        if labels.null_count < len(labels):
            raise UserError(f"pool {root}: {name} holds labels but pool.json lists no classes: re-pack the pool")
        return
    low, high = pc.min_max(labels).values()
    bad = low.as_py() if low.is_valid and low.as_py() < 0 else high.as_py()
    if high.is_valid and (low.as_py() < 0 or high.as_py() >= len(classes)):
        raise UserError(
            f"pool {root}: {name} holds the label {bad}, outside the {len(classes)} classes of pool.json: "
            "restore pool.json or re-pack the pool"
        )


# -- opening: the manifest against the files --------------------------------------------------------
def open_pool(where: str) -> PackedPool:
    """Open a packed pool (path or URI); checks the manifest against the split folders and every
    file's footer (rows, schema, image shape); reads no pixels and no file whole."""
    fs, base = filesystem(where)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"pool {where} does not exist: create it with `fm-ray pack SOURCE {where}`")
    try:
        with fs.open_input_stream(f"{base}/{MANIFEST}") as f:
            text = f.read()
    except OSError:
        raise UserError(
            f"{where} is not an fm_ray pool (no readable {MANIFEST}; an interrupted pack writes none): "
            f"run or finish `fm-ray pack SOURCE {where}`"
        ) from None
    manifest = _read_manifest(where, text)
    splits, footers = {}, {}
    for split in SPLITS:
        entry = manifest["splits"].get(split, {"files": []})
        _check_folder(fs, base, where, split, entry["files"])
        if split in manifest["splits"]:
            splits[split], footers[split] = _split_files(fs, base, where, manifest, entry)
    _check_normalization(where, manifest, footers["train"])
    return PackedPool(where, manifest, splits)


def _read_manifest(where: str, text: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    repack = f"re-pack the pool with `fm-ray pack SOURCE NEW_FOLDER` (or restore {MANIFEST})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{where}/{MANIFEST} is not an fm_ray pool manifest (a JSON object, format {FORMAT}): {repack}")
    version = manifest.get("version")
    if version != VERSION:
        pack = manifest.get("pack")
        source = pack.get("source", "SOURCE") if isinstance(pack, dict) else "SOURCE"
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UserError(f"{where}/{MANIFEST}: version {version!r} is not a format number (v{VERSION}): {repack}")
        if isinstance(version, int) and version < VERSION:
            raise UserError(
                f"pool {where} is format v{version}, packed by an older fm_ray: "
                f"pack it again into a new folder, `fm-ray pack {source} NEW_FOLDER`, and use that"
            )
        raise UserError(f"pool {where} is format v{version}, this fm_ray reads v{VERSION}: upgrade fm_ray")
    problem = _manifest_problem(manifest)
    if problem:
        raise UserError(f"{where}/{MANIFEST} is damaged ({problem}): {repack}")
    return manifest


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What is missing or malformed in a v2 manifest, or None."""

    def numbers(x: Any, n: int) -> bool:
        return isinstance(x, list) and len(x) == n and all(isinstance(v, int | float) for v in x)

    shape = m.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        return "image_shape is missing or not [C, H, W]"
    for key in ("mean", "std"):
        if not numbers(m.get(key), shape[0]):
            return f"{key} is missing or not {shape[0]} number per channel"
    classes = m.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return "classes is not a list of names"
    if not isinstance(m.get("augment"), bool):
        return "augment is not true or false"
    splits = m.get("splits")
    if not isinstance(splits, dict) or "train" not in splits or not set(splits) <= set(SPLITS):
        return "splits has no train entry" if isinstance(splits, dict) else "splits is missing"
    for split, entry in splits.items():
        if problem := _split_entry_problem(split, entry):
            return problem
    return None


def _split_entry_problem(split: str, entry: Any) -> str | None:
    """What is malformed in one split's manifest entry, or None."""
    if not isinstance(entry, dict):
        return f"splits.{split} is not an object"
    lists = [entry.get(key) for key in ("files", "file_rows", "ids_sha256", "labels_sha256", "group_sha256")]
    files, rows, ids, labels, groups = (x if isinstance(x, list) else None for x in lists)
    if (
        files is None
        or rows is None
        or ids is None
        or labels is None
        or groups is None
        or len({len(files), len(rows), len(ids), len(labels), len(groups)}) != 1
    ):
        return f"splits.{split} lacks files, file_rows, ids_sha256, labels_sha256 and group_sha256 of one length"
    for name in files:
        folder, _, file = name.partition("/") if isinstance(name, str) else ("", "", "")
        if folder != split or not file or "/" in file or file.startswith("."):
            return f"splits.{split} lists {name!r}, not a file of {split}/"
    if not all(isinstance(r, int) and r >= 0 for r in rows) or entry.get("rows") != sum(rows):
        return f"splits.{split} rows do not add up"
    if not all(isinstance(d, str) for d in ids + labels) or not all(
        isinstance(g, list) and all(isinstance(d, str) for d in g) for g in groups
    ):
        return f"splits.{split} digests are not lists of digests"
    return None


def _check_folder(fs: pafs.FileSystem, base: str, where: str, split: str, listed: list[str]) -> None:
    """The split folder holds exactly the listed files (hidden names, e.g. a killed writer's
    temporaries, aside)."""
    found = {
        f"{split}/{i.base_name}"
        for i in fs.get_file_info(pafs.FileSelector(f"{base}/{split}", allow_not_found=True))
        if i.type == pafs.FileType.File and not i.base_name.startswith(".")
    }
    if missing := sorted(set(listed) - found):
        raise UserError(
            f"pool {where}: {missing[0]} is listed in {MANIFEST} but missing: restore it or re-pack the pool"
        )
    if extra := sorted(found - set(listed)):
        raise UserError(
            f"pool {where}: {extra[0]} is in the pool folder but not in {MANIFEST} (added, or dropped from the "
            "manifest): remove it or restore pool.json, or re-pack the pool"
        )


def _split_files(
    fs: pafs.FileSystem, base: str, where: str, manifest: dict[str, Any], entry: dict
) -> tuple[SplitFiles, list[dict[str, Any]]]:
    """The row-group table of one split, each file's footer checked against the manifest; and the
    footers' fm_ray metadata."""
    groups: list[tuple[int, int, int]] = []
    metas = []
    start = 0
    for f, (name, rows) in enumerate(zip(entry["files"], entry["file_rows"], strict=True)):
        try:
            meta = pq.read_metadata(fs.open_input_file(f"{base}/{name}"))
        except (OSError, pa.ArrowException):
            raise UserError(f"pool {where}: {name} is missing or unreadable: restore it or re-pack the pool") from None
        READ_BYTES["footer"] += meta.serialized_size
        metas.append(_check_footer(where, name, meta, rows, manifest, entry, f))
        for g in range(meta.num_row_groups):
            groups.append((f, g, start))
            start += meta.row_group(g).num_rows
    table = np.array(groups, dtype=np.int64).reshape(-1, 3)
    split_files = SplitFiles(
        tuple(entry["files"]),
        tuple(entry["ids_sha256"]),
        tuple(entry["labels_sha256"]),
        tuple(d for g in entry["group_sha256"] for d in g),
        table[:, 0],
        table[:, 1],
        np.append(table[:, 2], start).astype(np.int64),
    )
    return split_files, metas


def _check_footer(
    where: str, name: str, meta: pq.FileMetaData, rows: int, manifest: dict[str, Any], entry: dict, f: int
) -> dict[str, Any]:
    """The file is the one pool.json lists: rows, columns, and what it was packed with (shape,
    classes, augmentation, digests) as its own footer records them. Returns that record."""
    changed = "it was changed after packing; restore it or re-pack the pool"
    if meta.num_rows != rows:
        raise UserError(f"pool {where}: {name} holds {meta.num_rows} rows, the manifest says {rows}: {changed}")
    schema = meta.schema.to_arrow_schema()
    if not schema.remove_metadata().equals(SCHEMA):
        raise UserError(
            f"pool {where}: {name} has the columns ({_columns_text(schema)}), not ({_columns_text(SCHEMA)}): {changed}"
        )
    try:
        record = json.loads((schema.metadata or {})[FILE_META])
        shape = record["shape"]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"pool {where}: {name} carries no fm_ray metadata: {changed}") from None
    image_shape = manifest["image_shape"]
    if shape is not None and list(shape) != list(image_shape):
        raise UserError(
            f"pool {where}: {MANIFEST} says the images are {_shape_text(image_shape)}, {name} holds "
            f"{_shape_text(shape)} images: restore {MANIFEST} or re-pack the pool"
        )
    for key in ("classes", "augment"):
        if record.get(key) != manifest[key]:
            raise UserError(
                f"pool {where}: {MANIFEST}'s {key} ({manifest[key]}) are not what {name} was packed with "
                f"({record.get(key)}): restore {MANIFEST} or re-pack the pool"
            )
    keys = ("ids_sha256", "labels_sha256", "group_sha256")
    if [record.get(k) for k in keys] != [entry[k][f] for k in keys] or len(entry["group_sha256"][f]) != (
        meta.num_row_groups
    ):
        raise _changed(where, name, "its digests")
    return record


def _check_normalization(where: str, manifest: dict[str, Any], train: list[dict[str, Any]]) -> None:
    """pool.json's mean and std are in range and are what the files were packed with: the source's
    own (recorded in every footer), else the ones the footers' exact pixel sums give."""
    mean, std = manifest["mean"], manifest["std"]
    fix = f"restore {MANIFEST} or re-pack the pool"
    if not all(math.isfinite(m) and 0 <= m <= 1 for m in mean) or not all(math.isfinite(v) and v > 0 for v in std):
        raise UserError(f"pool {where}: {MANIFEST}'s mean {mean} or std {std} is out of range: {fix}")
    given = {json.dumps(m.get("norm")) for m in train}
    if given != {"null"}:
        expected = json.loads(given.pop()) if len(given) == 1 else None
    else:
        expected = list(map(list, sums_mean_std(train, len(mean))))
    if expected != [list(mean), list(std)]:
        raise UserError(
            f"pool {where}: {MANIFEST}'s mean {mean} and std {std} are not the ones its images were packed with: {fix}"
        )


def _columns_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _shape_text(shape: list[int]) -> str:
    return "x".join(map(str, shape))
