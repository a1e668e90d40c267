"""`fm-ray pack SOURCE OUT`: a dataset -> a packed Parquet pool (format: fm_ray.packed).

Sources: `fashion_mnist`, `cifar10` (stored with exactly the mean/std/augment fm_ray.data uses, so
a packed built-in gives bit-identical inputs), `imagefolder:<path>` (train/ and test/ class
folders), `folder:<path>` (unlabeled images, recursive) and `csv:<file>` (a `path` column, optional
`label` and `split` columns). Image files are decoded in parallel with Ray Data.

Resumable and deterministic: the source's rows are cut into files of `rows_per_file`; each file is
written atomically (`write_bytes_atomically`), so it is either whole or absent. When a pack begins it
records the source's listing (`listing.parquet`: id, label, bytes, sha256 of every item) and each
part file records the digest of the items it holds; a re-run keeps exactly the files whose items are
unchanged and packs the others again, so a source changed in between never gives a mix of old and
new rows. `pool.json` is written last, with each file's rows and sha256. The same source and
options give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from fm_ray._internal.files import write_bytes_atomically
from fm_ray._internal.log import log, progress
from fm_ray.data.core import Split as DataSplit
from fm_ray.data.core import hw, pixel_sums, skipped_csv, sums_mean_std
from fm_ray.data.decode import collect, decode_file_or_reason, grey_only
from fm_ray.data.files import FileSplit, list_files
from fm_ray.data.fingerprint import Item, array_listing, file_listing, slice_digest
from fm_ray.data.parquet import (
    FILE_META,
    FORMAT,
    LISTING,
    LISTING_SCHEMA,
    MANIFEST,
    ROW_GROUP,
    SCHEMA,
    SKIPPED_CSV,
    SPLITS,
    VERSION,
    filesystem,
    ids_digest,
    image_digest,
    labels_digest,
    part_name,
)
from fm_ray.data.registry import check_outside, open_source, parse_spec
from fm_ray.data.source import read_all
from fm_ray.errors import UserError

ROWS_PER_FILE = 8192
SPEC = "pack_spec.json"  # what is being packed: a resumed pack must be the same source and options


@dataclass
class Chunk:
    """Rows [a, b) of a split, decoded: images uint8 (N, C, H, W); `skipped` are (name, why)."""

    ids: list[str]
    labels: list[int] | None
    images: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Split:
    n: int  # source items, before any are skipped
    read: Callable[[int, int], Chunk]
    listing: list[Item] | None = None  # the n items in order (fm_ray.data.fingerprint): a pack needs it


@dataclass
class PackSource:
    name: str
    splits: dict[str, Split]
    classes: list[str] | None  # label i is classes[i]; None: unlabeled
    mean_std: tuple[list[float], list[float]] | None  # None: computed from the train pixels
    augment: bool
    options: dict[str, Any]  # identifies the pack (source, resize, ...) for the resume check


class PackInterrupted(Exception):
    """Raised by the test hook `stop_after` after that many files were written."""


# -- packing ------------------------------------------------------------------------------------
def pack(
    source: str,
    out: str,
    resize: tuple[int, int] | None = None,
    skip_bad: bool = False,
    channels: int | None = None,
    data_dir: str | None = None,
    rows_per_file: int = ROWS_PER_FILE,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Pack `source` into `out` (a path or URI); returns the manifest."""
    if rows_per_file <= 0:
        raise UserError(f"--rows-per-file must be positive, got {rows_per_file}")
    if channels not in (None, 1, 3):
        raise UserError(f"--channels must be 1 or 3, got {channels}")
    import ray

    check_outside(out, source, data_dir, "OUT")
    started = not ray.is_initialized()  # file sources decode on Ray Data, which starts Ray if needed
    try:
        src = pack_input(source, resize, skip_bad, channels, data_dir)
        return pack_source(src, out, rows_per_file, stop_after)
    finally:
        if started and ray.is_initialized():  # leave no Ray instance behind that this call started
            ray.shutdown()


def pack_source(src: PackSource, out: str, rows_per_file: int = ROWS_PER_FILE, stop_after: int | None = None) -> dict:
    fs, base = filesystem(out)
    spec = {"format": FORMAT, "version": VERSION, **src.options, "rows_per_file": rows_per_file}
    listing = _listing(src)
    plan = {s: _plan(s, src.classes, items, rows_per_file) for s, items in listing.items()}
    listed = hashlib.sha256(json.dumps(plan).encode()).hexdigest()
    done = _already_packed(fs, base, out, spec, listed, src.name)
    if done is not None:
        return done
    fs.create_dir(base, recursive=True)
    write_bytes_atomically(fs, f"{base}/{SPEC}", json.dumps(spec, indent=1).encode())
    # a resumed pack keeps only the files packed from the very items planned for them now: the
    # source may have changed since the pack began, and a mix of old and new rows is never kept
    kept = _keep_unchanged(fs, base, plan)
    recorded = _read_bytes(fs, f"{base}/{LISTING}")
    if recorded != (now := _listing_bytes(listing)):  # the listing as this pack began, or as it resumes now
        if recorded is not None:
            _log_changes(recorded, src.name, listing, len(kept), sum(map(len, plan.values())))
        write_bytes_atomically(fs, f"{base}/{LISTING}", now)
    shape = _packed_shape(fs, base, kept)
    written = 0
    for split_name, split in src.splits.items():
        names = [name for name, _ in plan[split_name]]
        todo = [i for i, name in enumerate(names) if name not in kept]
        if len(todo) < len(names):
            log(f"{split_name}: {len(names) - len(todo)} of {len(names)} files already packed, resuming")
        for i in progress(todo, f"packing {src.name} {split_name}", total=len(todo), unit="file"):
            chunk = split.read(i * rows_per_file, min(split.n, (i + 1) * rows_per_file))
            meta = _chunk_meta(chunk, plan[split_name][i][1], src)
            if meta["shape"] and shape and tuple(meta["shape"]) != shape:
                raise UserError(
                    f"images differ in size: {meta['first_id']} is {hw(meta['shape'])}, earlier ones are "
                    f"{hw(shape)}: pass --resize N (or HxW) to pack them at one size"
                )
            shape = shape or (tuple(meta["shape"]) if meta["shape"] else None)
            _write_chunk(fs, f"{base}/{names[i]}", chunk, meta)
            kept.add(names[i])
            written += 1
            if stop_after is not None and written >= stop_after:
                raise PackInterrupted(f"stopped after {written} files")
    files = {s: [name for name, _ in p] for s, p in plan.items()}
    return _finish(src, fs, base, out, spec, files, listed)


def _already_packed(fs: pafs.FileSystem, base: str, out: str, spec: dict, listed: str, name: str) -> dict | None:
    """The manifest of a finished pack of exactly this source as it is now; None where the pack is
    to start or resume; a UserError where OUT holds something else."""
    done = _read_json(fs, f"{base}/{MANIFEST}", out)
    if done is not None:
        if done.get("pack") != spec:
            raise UserError(
                f"{out} already holds a pool packed from {done.get('pack')}: choose another OUT or delete it"
            )
        if done.get("listing", {}).get("sha256") != listed:
            raise UserError(
                f"{out} holds {name} as it was when packed, and the source has changed since: "
                f"pack it into a new OUT (or delete {out} and pack again)"
            )
        log(f"{out} is already packed ({done['splits']['train']['rows']} train rows): nothing to do")
        return done
    begun = _read_json(fs, f"{base}/{SPEC}", out)
    if begun is None and fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        raise UserError(f"{out} exists and is not an fm_ray pool being packed: choose a new or empty OUT")
    if begun is not None and begun != spec:
        raise UserError(
            f"{out} holds an interrupted pack of {begun}, not of {spec}: pack into another OUT or delete it"
        )
    return None


def _listing(src: PackSource) -> dict[str, list[Item]]:
    for s, split in src.splits.items():
        if split.listing is None or len(split.listing) != split.n:
            raise ValueError(f"source {src.name} lists no {s} items (Split.listing): every pack source must")
    return {s: list(split.listing) for s, split in src.splits.items()}  # type: ignore[arg-type]


def _plan(split: str, classes: list[str] | None, items: list[Item], rows_per_file: int) -> list[tuple[str, str]]:
    """(part file, digest of the items it holds) for each file of a split."""
    n = -(-len(items) // rows_per_file)
    return [
        (part_name(split, i), slice_digest(classes, items[i * rows_per_file : (i + 1) * rows_per_file]))
        for i in range(n)
    ]


def _keep_unchanged(fs: pafs.FileSystem, base: str, plan: dict[str, list[tuple[str, str]]]) -> set[str]:
    """Part files already there that hold the items planned for them. Every other file in the split
    folders (stale parts, parts past the source's new end, temporaries of a killed writer) is deleted."""
    planned = {name: digest for p in plan.values() for name, digest in p}
    kept = set()
    for split in SPLITS:
        for info in fs.get_file_info(pafs.FileSelector(f"{base}/{split}", allow_not_found=True)):
            if info.type != pafs.FileType.File:
                continue
            name = f"{split}/{info.base_name}"
            if name in planned and _source_digest(fs, info.path) == planned[name]:
                kept.add(name)
            else:
                fs.delete_file(info.path)
    return kept


def _source_digest(fs: pafs.FileSystem, path: str) -> str | None:
    try:
        return _file_meta(fs, path).get("source_sha256")
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError):
        return None  # unreadable or not ours: packed again


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, pa.ArrowException):
        return None


def _log_changes(recorded: bytes, name: str, listing: dict[str, list[Item]], kept: int, total: int) -> None:
    """Say what changed in the source since the pack began (its listing was recorded then)."""
    try:
        rows = pq.read_table(pa.BufferReader(recorded)).to_pylist()
    except (OSError, pa.ArrowException):
        return
    old = {(r["split"], r["id"]): (r["label"], r["bytes"], r["sha256"]) for r in rows}
    new = {(s, i.id): (i.label, i.bytes, i.sha256) for s, items in listing.items() for i in items}
    if old == new:
        return
    removed, added = old.keys() - new.keys(), new.keys() - old.keys()
    changed = {k for k in old.keys() & new.keys() if old[k] != new[k]}
    example = min(removed | added | changed or {("", "the class list")})[1]
    log(
        f"{name} changed since this pack began (items removed: {len(removed)}, added: {len(added)}, "
        f"changed: {len(changed)}; e.g. {example}): keeping the {kept} of {total} files whose items did "
        "not change, packing the rest again"
    )


def _listing_bytes(listing: dict[str, list[Item]]) -> bytes:
    rows = [{"split": s, **i._asdict()} for s, items in listing.items() for i in items]
    table = pa.Table.from_pylist(rows, schema=LISTING_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _packed_shape(fs: pafs.FileSystem, base: str, names: Iterable[str]) -> tuple[int, ...] | None:
    for name in names:
        if shape := _file_meta(fs, f"{base}/{name}")["shape"]:
            return tuple(shape)
    return None


def _chunk_meta(chunk: Chunk, source_sha256: str, src: PackSource) -> dict[str, Any]:
    """What a part file records of itself in its footer (fm_ray.data.parquet's module doc); the
    digests are added as it is written."""
    n = len(chunk.ids)
    # exact integer pixel sums per channel, so the pool's mean/std do not depend on how the rows
    # were cut into files or when a pack was resumed
    sums, sumsqs, pixels = pixel_sums(chunk.images) if n else ([], [], 0)
    return {
        "shape": list(chunk.images.shape[1:]) if n else None,
        "first_id": chunk.ids[0] if n else None,
        "skipped": [list(s) for s in chunk.skipped],
        "pixel_sum": sums,
        "pixel_sumsq": sumsqs,
        "pixels_per_channel": pixels,
        "source_sha256": source_sha256,  # the source items this file was packed from (fingerprint.slice_digest)
        "classes": src.classes,
        "augment": src.augment,
        "norm": None if src.mean_std is None else [list(src.mean_std[0]), list(src.mean_std[1])],
    }


def _write_chunk(fs: pafs.FileSystem, path: str, chunk: Chunk, meta: dict[str, Any]) -> None:
    """Write one part file, its footer recording `meta` and the digests of what it holds: one per
    row group of `ROW_GROUP` images, one of its ids and labels."""
    n = len(chunk.ids)
    flat = np.ascontiguousarray(chunk.images).reshape(n, -1) if n else np.zeros((0, 0), np.uint8)
    size = flat.shape[1]
    images = pa.Array.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * size), pa.py_buffer(flat.tobytes())]
    )
    ids = pa.array(chunk.ids, pa.string())
    labels = pa.array(chunk.labels if chunk.labels is not None else [None] * n, type=pa.int64())
    meta = {
        **meta,
        "ids_sha256": ids_digest(ids),
        "labels_sha256": labels_digest(labels),
        "group_sha256": [image_digest(flat[a : a + ROW_GROUP]) for a in range(0, n, ROW_GROUP)],
    }
    table = pa.table([ids, images, labels], schema=SCHEMA).replace_schema_metadata(
        {FILE_META: json.dumps(meta, sort_keys=True).encode()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP, compression="zstd", write_statistics=["id", "label"])
    write_bytes_atomically(fs, path, sink.getvalue().to_pybytes())


def _file_meta(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    return json.loads(pq.read_schema(fs.open_input_file(path)).metadata[FILE_META])


def _finish(
    src: PackSource, fs: pafs.FileSystem, base: str, out: str, spec: dict, files: dict, listed: str
) -> dict[str, Any]:
    metas = {s: [_file_meta(fs, f"{base}/{name}") for name in names] for s, names in files.items()}
    rows = {
        s: [pq.read_metadata(fs.open_input_file(f"{base}/{name}")).num_rows for name in names]
        for s, names in files.items()
    }
    shapes = {tuple(m["shape"]) for ms in metas.values() for m in ms if m["shape"]}
    if not shapes:
        raise UserError(f"{src.name} has no images to pack (or every image was skipped): check the source")
    if len(shapes) > 1:
        raise UserError(f"images differ in size ({', '.join(sorted(hw(s) for s in shapes))}): pass --resize N (or HxW)")
    (shape,) = shapes
    if src.mean_std is not None:
        mean, std = tuple(src.mean_std[0]), tuple(src.mean_std[1])
    else:
        mean, std = sums_mean_std(metas["train"], shape[0])
    skipped = [s for ms in metas.values() for m in ms for s in m["skipped"]]
    if skipped:
        write_bytes_atomically(fs, f"{base}/{SKIPPED_CSV}", skipped_csv([tuple(s) for s in skipped]))
        log(f"skipped {len(skipped)} undecodable images: listed in {out}/{SKIPPED_CSV}")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "name": src.name,
        "image_shape": list(shape),
        "image_encoding": "raw",
        "classes": src.classes,
        "mean": list(mean),
        "std": list(std),
        "augment": src.augment,
        "splits": {
            s: {
                "rows": sum(rows[s]),
                "files": names,
                "file_rows": rows[s],
                "ids_sha256": [m["ids_sha256"] for m in metas[s]],
                "labels_sha256": [m["labels_sha256"] for m in metas[s]],
                "group_sha256": [m["group_sha256"] for m in metas[s]],
            }
            for s, names in files.items()
        },
        "listing": {"file": LISTING, "sha256": listed, "items": {s: src.splits[s].n for s in files}},
        "skipped_images": len(skipped),
        "pack": spec,
    }
    write_bytes_atomically(fs, f"{base}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    log(f"packed {src.name}: " + ", ".join(f"{s} {sum(rows[s])} rows" for s in files) + f" -> {out}")
    return manifest


def _read_json(fs: pafs.FileSystem, path: str, out: str) -> dict[str, Any] | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        text = f.read()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise UserError(
            f"{path.rsplit('/', 1)[1]} in {out} is damaged (not a JSON object): delete {out} and pack again"
        )
    return value


# -- what is packed: a registered source, listed (image files) or opened (built-ins) ----------------
PARALLEL_MIN_FILES = 2048  # fewer image files than this decode in-process: starting Ray costs more


def parse_resize(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, _, w = text.lower().partition("x")
        size = (int(h), int(w or h))
    except ValueError:
        raise UserError(f"--resize must be N or HxW (e.g. 32 or 28x28), got {text!r}") from None
    if min(size) <= 0:
        raise UserError(f"--resize must be positive, got {text!r}")
    return size


def pack_input(
    source: str, resize: tuple[int, int] | None, skip_bad: bool, channels: int | None, data_dir: str | None
) -> PackSource:
    """What `fm-ray pack SOURCE` packs, from the one registry: image files are listed here and decoded
    file by file as the pack goes (the same decoder and rules as `fm-ray run`); built-ins are opened."""
    kind, arg = parse_spec(source)
    if kind == "parquet":
        raise UserError(f"{source} is already a packed pool: use it as --dataset {source}")
    if kind in ("fashion_mnist", "cifar10"):
        if resize is not None:
            raise UserError(f"--resize is for image files; {kind} is packed as it is: drop --resize")
        return _builtin(kind, data_dir, {"source": source})
    listing = list_files(kind, arg)
    if channels is None:  # the one channel rule (as `fm-ray run` decodes the same files): grey if all are
        channels = 1 if grey_only([p for s in listing.splits.values() for p in s.paths]) else 3
    where = listing.root if kind != "csv" else Path(arg).expanduser().resolve()
    # --skip-bad-images is not part of what identifies a pack: a re-run adding it resumes the same files
    options = {"source": f"{kind}:{where}", "resize": list(resize) if resize else None, "channels": channels}
    decode = _FileDecoder(resize, skip_bad, channels, sum(len(s.paths) for s in listing.splits.values()))
    splits = {name: decode.split(files) for name, files in listing.splits.items()}
    name = f"{kind}:{where.stem if kind == 'csv' else where.name}"
    classes = list(listing.classes) if listing.classes else None
    return PackSource(name, splits, classes, None, listing.augment, options)


def _builtin(name: str, data_dir: str | None, options: dict[str, Any]) -> PackSource:
    data = open_source(name, data_dir=data_dir)

    def split(part: DataSplit) -> Split:
        x, y = read_all(part.images), part.labels
        assert y is not None  # the built-ins are labeled

        def read(a: int, b: int) -> Chunk:
            return Chunk(list(part.ids[a:b]), y[a:b].tolist(), x[a:b].numpy())

        return Split(len(part), read, array_listing(list(part.ids), y.tolist(), x.numpy()))

    assert data.test is not None and data.classes is not None
    splits = {"train": split(data.train), "test": split(data.test)}
    return PackSource(name, splits, list(data.classes), (list(data.mean), list(data.std)), data.augment, options)


class _FileDecoder:
    """Decodes image files with the one decoder: on Ray Data for a large source, in-process for a small one."""

    def __init__(self, resize: tuple[int, int] | None, skip_bad: bool, channels: int, n_files: int):
        self.resize, self.skip_bad, self.channels = resize, skip_bad, channels
        self.parallel = n_files >= PARALLEL_MIN_FILES

    def split(self, files: FileSplit) -> Split:
        items = [
            (p, i, None if files.labels is None else files.labels[n])
            for n, (p, i) in enumerate(zip(files.paths, files.ids, strict=True))
        ]
        return Split(len(files.paths), lambda a, b: self.decode(files, a, b), file_listing(items))

    def decode(self, files: FileSplit, a: int, b: int) -> Chunk:
        paths, ids = files.paths[a:b], files.ids[a:b]
        if self.parallel:
            decoded = self._on_ray(paths)
        else:
            decoded = [decode_file_or_reason(p, self.channels, self.resize) for p in paths]
        got = collect(paths, decoded, self.skip_bad)
        labels = None if files.labels is None else [files.labels[a + i] for i in got.kept]
        stacked = torch.stack(got.images).numpy() if got.images else np.zeros((0, 0, 0, 0), np.uint8)
        id_of = dict(zip(paths, ids, strict=True))  # skipped images are listed by id
        skipped = [(id_of[p], why) for p, why in got.skipped]
        return Chunk([ids[i] for i in got.kept], labels, stacked, skipped)

    def _on_ray(self, paths: list[str]) -> list[torch.Tensor | str]:
        import ray

        from fm_ray._internal.ray_session import ensure_ray

        ensure_ray(None)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # fm_ray's own progress draws one bar per file instead
        rows = [{"seq": i, "path": p} for i, p in enumerate(paths)]
        ds = ray.data.from_items(rows).map_batches(
            decode_batch,  # type: ignore[arg-type]  # ray's stub types the UDF without the fn_kwargs it gets
            batch_size=64,
            batch_format="pyarrow",
            fn_kwargs={"resize": self.resize, "channels": self.channels},
        )
        out: list[torch.Tensor | str] = [""] * len(paths)
        for r in ds.take_all():
            shape = (r["c"], r["h"], r["w"])
            out[r["seq"]] = (
                r["why"]
                if r["why"] is not None
                else torch.frombuffer(bytearray(r["image"]), dtype=torch.uint8).view(shape)
            )
        return out


def decode_batch(batch: pa.Table, resize: tuple[int, int] | None, channels: int) -> pa.Table:
    """Ray Data UDF: `decode_file_or_reason` on each file; raw uint8 bytes and shape, or the reason."""
    out: dict[str, list[Any]] = {k: [] for k in ("seq", "image", "c", "h", "w", "why")}
    for seq, path in zip(batch.column("seq").to_pylist(), batch.column("path").to_pylist(), strict=True):
        image = decode_file_or_reason(path, channels, resize)
        out["seq"].append(seq)
        if isinstance(image, str):
            out["image"].append(None)
            shape: tuple[int, ...] = (0, 0, 0)
        else:
            out["image"].append(image.numpy().tobytes())
            shape = tuple(image.shape)
        for k, v in zip(("c", "h", "w"), shape, strict=True):
            out[k].append(int(v))
        out["why"].append(image if isinstance(image, str) else None)
    schema = pa.schema([("seq", pa.int64()), ("image", pa.binary()), ("c", pa.int32()), ("h", pa.int32()),
                        ("w", pa.int32()), ("why", pa.string())])  # fmt: skip
    return pa.table(out, schema=schema)
