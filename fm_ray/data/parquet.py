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

Nothing in the manifest is trusted alone (format v2). `open_pool` checks it against the files: each
split folder holds exactly the listed files, each file its listed rows, the schema and the image
shape its own footer records. Each part file's sha256 (in pool.json) is checked the first time a
process reads the file (the driver for ids and labels, a shard for its pixels), once per process.
"""

from __future__ import annotations

import hashlib
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
VERSION = 2  # 2: per-file rows and sha256 and the source listing; v1 pools are packed again
MANIFEST = "pool.json"
LISTING = "listing.parquet"
SKIPPED_CSV = "skipped_images.csv"
SPLITS = ("train", "test")
ROW_GROUP = 1024  # rows per Parquet row group: the unit a shard or the driver reads
SCHEMA = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64())])
LISTING_SCHEMA = pa.schema(
    [("split", pa.string()), ("id", pa.string()), ("label", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())]
)
FILE_META = b"fm_ray"  # per-file Parquet schema metadata: shape, skipped images, exact pixel sums, source digest


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
    sha256: tuple[str, ...]  # of each file's bytes, from pool.json
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
            if f not in opened:
                verify(fs, base, self.root, name, self.files.sha256[f])
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
            for name, digest in zip(files.files, files.sha256, strict=True):
                verify(fs, base, self.root, name, digest)
                try:
                    parts.append(pq.read_table(f"{base}/{name}", columns=["id", "label"], filesystem=fs))
                except (OSError, pa.ArrowException) as e:
                    raise UserError(
                        f"pool {self.root}: {name} cannot be read ({str(e).splitlines()[0][:120]}): "
                        "restore the file or re-pack the pool"
                    ) from None
                _check_labels(self.root, name, parts[-1].column("label"), self.manifest["classes"])
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


def _check_labels(root: str, name: str, labels: pa.ChunkedArray, classes: list[str] | None) -> None:
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


# -- digests: each part file checked once per process, the first time it is read ------------------
_VERIFIED: set[tuple[str, str, str]] = set()  # (filesystem type, path, sha256) checked in this process


def sha256_of(fs: pafs.FileSystem, path: str) -> str:
    """sha256 of a file's bytes, streamed (a part file is never held whole for it)."""
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def verify(fs: pafs.FileSystem, base: str, root: str, name: str, sha256: str) -> None:
    """The pool file `name` is the one pool.json recorded, or one UserError naming it."""
    key = (fs.type_name, f"{base}/{name}", sha256)
    if key in _VERIFIED:
        return
    try:
        found = sha256_of(fs, f"{base}/{name}")
    except OSError as e:
        raise UserError(
            f"pool {root}: {name} cannot be read ({str(e).splitlines()[0][:120]}): restore the file or re-pack the pool"
        ) from None
    if found != sha256:
        raise UserError(
            f"pool {root}: {name} is not the file that was packed (its sha256 differs from pool.json's): "
            "restore it or re-pack the pool"
        )
    _VERIFIED.add(key)


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
    splits = {}
    for split in SPLITS:
        entry = manifest["splits"].get(split, {"files": []})
        _check_folder(fs, base, where, split, entry["files"])
        if split in manifest["splits"]:
            splits[split] = _split_files(fs, base, where, manifest, entry)
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
                f"pool {where} is format v{version}, packed by an older fm_ray without file digests: "
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
    files, rows, digests = entry.get("files"), entry.get("file_rows"), entry.get("file_sha256")
    if not (isinstance(files, list) and isinstance(rows, list) and isinstance(digests, list)) or not (
        len(files) == len(rows) == len(digests)
    ):
        return f"splits.{split} lacks files, file_rows and file_sha256 of one length"
    for name in files:
        folder, _, file = name.partition("/") if isinstance(name, str) else ("", "", "")
        if folder != split or not file or "/" in file or file.startswith("."):
            return f"splits.{split} lists {name!r}, not a file of {split}/"
    if not all(isinstance(r, int) and r >= 0 for r in rows) or entry.get("rows") != sum(rows):
        return f"splits.{split} rows do not add up"
    if not all(isinstance(d, str) for d in digests):
        return f"splits.{split}.file_sha256 is not a list of digests"
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


def _split_files(fs: pafs.FileSystem, base: str, where: str, manifest: dict[str, Any], entry: dict) -> SplitFiles:
    """The row-group table of one split, each file's footer checked against the manifest."""
    groups: list[tuple[int, int, int]] = []
    start = 0
    for f, (name, rows) in enumerate(zip(entry["files"], entry["file_rows"], strict=True)):
        try:
            meta = pq.read_metadata(fs.open_input_file(f"{base}/{name}"))
        except (OSError, pa.ArrowException):
            raise UserError(f"pool {where}: {name} is missing or unreadable: restore it or re-pack the pool") from None
        _check_footer(where, name, meta, rows, manifest["image_shape"])
        for g in range(meta.num_row_groups):
            groups.append((f, g, start))
            start += meta.row_group(g).num_rows
    table = np.array(groups, dtype=np.int64).reshape(-1, 3)
    return SplitFiles(
        tuple(entry["files"]),
        tuple(entry["file_sha256"]),
        table[:, 0],
        table[:, 1],
        np.append(table[:, 2], start).astype(np.int64),
    )


def _check_footer(where: str, name: str, meta: pq.FileMetaData, rows: int, image_shape: list[int]) -> None:
    changed = "it was changed after packing; restore it or re-pack the pool"
    if meta.num_rows != rows:
        raise UserError(f"pool {where}: {name} holds {meta.num_rows} rows, the manifest says {rows}: {changed}")
    schema = meta.schema.to_arrow_schema()
    if not schema.remove_metadata().equals(SCHEMA):
        raise UserError(
            f"pool {where}: {name} has the columns ({_columns_text(schema)}), not ({_columns_text(SCHEMA)}): {changed}"
        )
    try:
        shape = json.loads((schema.metadata or {})[FILE_META])["shape"]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"pool {where}: {name} carries no fm_ray metadata: {changed}") from None
    if shape is not None and list(shape) != list(image_shape):
        raise UserError(
            f"pool {where}: {MANIFEST} says the images are {_shape_text(image_shape)}, {name} holds "
            f"{_shape_text(shape)} images: restore {MANIFEST} or re-pack the pool"
        )


def _columns_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _shape_text(shape: list[int]) -> str:
    return "x".join(map(str, shape))
