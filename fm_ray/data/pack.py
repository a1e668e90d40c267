"""`fm-ray pack SOURCE OUT`: a dataset -> a packed Parquet pool (format: fm_ray.packed).

Sources: `fashion_mnist`, `cifar10` (stored with exactly the mean/std/augment fm_ray.data uses, so
a packed built-in gives bit-identical inputs), `imagefolder:<path>` (train/ and test/ class
folders), `folder:<path>` (unlabeled images, recursive) and `csv:<file>` (a `path` column, optional
`label` and `split` columns). Image files are decoded in parallel with Ray Data.

Resumable and deterministic: the source's rows are cut into files of `rows_per_file`; each file is
written under a temporary name and renamed, so it is either whole or absent; a re-run skips the
files already there; `pool.json` is written last. The same source and options give the same bytes.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fm_ray._internal.log import log, progress
from fm_ray.data.decode import IMAGE_SUFFIXES, BadImage, decode_image_bytes
from fm_ray.data.parquet import FORMAT, MANIFEST, ROW_GROUP, SCHEMA, SKIPPED_CSV, VERSION, filesystem, part_name
from fm_ray.errors import UserError

ROWS_PER_FILE = 8192
SPEC = "pack_spec.json"  # what is being packed: a resumed pack must be the same source and options
SOURCES = ("fashion_mnist", "cifar10", "imagefolder:<path>", "folder:<path>", "csv:<file>")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_META = b"fm_ray"  # per-file Parquet schema metadata: shape, skipped images, exact pixel sums


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
    channels: int = 3,
    data_dir: str | None = None,
    rows_per_file: int = ROWS_PER_FILE,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Pack `source` into `out` (a path or URI); returns the manifest."""
    if rows_per_file <= 0:
        raise UserError(f"--rows-per-file must be positive, got {rows_per_file}")
    if channels not in (1, 3):
        raise UserError(f"--channels must be 1 or 3, got {channels}")
    import ray

    started = not ray.is_initialized()  # file sources decode on Ray Data, which starts Ray if needed
    try:
        src = open_source(source, resize, skip_bad, channels, data_dir)
        return pack_source(src, out, rows_per_file, stop_after)
    finally:
        if started and ray.is_initialized():  # leave no Ray instance behind that this call started
            ray.shutdown()


def pack_source(src: PackSource, out: str, rows_per_file: int = ROWS_PER_FILE, stop_after: int | None = None) -> dict:
    fs, base = filesystem(out)
    spec = {"format": FORMAT, "version": VERSION, **src.options, "rows_per_file": rows_per_file}
    done = _read_json(fs, f"{base}/{MANIFEST}")
    if done is not None:
        if done.get("pack") != spec:
            raise UserError(
                f"{out} already holds a pool packed from {done.get('pack')}: choose another OUT or delete it"
            )
        log(f"{out} is already packed ({done['splits']['train']['rows']} train rows): nothing to do")
        return done
    begun = _read_json(fs, f"{base}/{SPEC}")
    if begun is None and fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        raise UserError(f"{out} exists and is not an fm_ray pool being packed: choose a new or empty OUT")
    if begun is not None and begun != spec:
        raise UserError(
            f"{out} holds an interrupted pack of {begun}, not of {spec}: pack into another OUT or delete it"
        )
    fs.create_dir(base, recursive=True)
    _write_atomic(fs, f"{base}/{SPEC}", json.dumps(spec, indent=1).encode())
    files = {
        name: [part_name(name, i) for i in range(-(-split.n // rows_per_file))] for name, split in src.splits.items()
    }
    shape = _packed_shape(fs, base, files)  # of a file packed before an interruption, if any
    written = 0
    for split_name, split in src.splits.items():
        names = files[split_name]
        todo = [i for i, name in enumerate(names) if not _exists(fs, f"{base}/{name}")]
        if len(todo) < len(names):
            log(f"{split_name}: {len(names) - len(todo)} of {len(names)} files already packed, resuming")
        for i in progress(todo, f"packing {src.name} {split_name}", total=len(todo), unit="file"):
            chunk = split.read(i * rows_per_file, min(split.n, (i + 1) * rows_per_file))
            meta = _chunk_meta(chunk)
            if meta["shape"] and shape and tuple(meta["shape"]) != shape:
                raise UserError(
                    f"images differ in size: {meta['first_id']} is {_hw(meta['shape'])}, earlier ones are "
                    f"{_hw(shape)}: pass --resize N (or HxW) to pack them at one size"
                )
            shape = shape or (tuple(meta["shape"]) if meta["shape"] else None)
            _write_chunk(fs, f"{base}/{names[i]}", chunk, meta)
            written += 1
            if stop_after is not None and written >= stop_after:
                raise PackInterrupted(f"stopped after {written} files")
    return _finish(src, fs, base, out, spec, files)


def _packed_shape(fs: pafs.FileSystem, base: str, files: dict[str, list[str]]) -> tuple[int, ...] | None:
    for names in files.values():
        for name in names:
            if _exists(fs, f"{base}/{name}") and (shape := _file_meta(fs, f"{base}/{name}")["shape"]):
                return tuple(shape)
    return None


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[-2]}x{shape[-1]}" + (f" with {shape[0]} channels" if len(shape) == 3 else "")


def _chunk_meta(chunk: Chunk) -> dict[str, Any]:
    n = len(chunk.ids)
    # exact integer pixel sums per channel (from value histograms), so the pool's mean/std do not
    # depend on how the rows were cut into files or when a pack was resumed
    hist = [np.bincount(chunk.images[:, c].ravel(), minlength=256) for c in range(chunk.images.shape[1])] if n else []
    values = np.arange(256, dtype=np.int64)
    return {
        "shape": list(chunk.images.shape[1:]) if n else None,
        "first_id": chunk.ids[0] if n else None,
        "skipped": [list(s) for s in chunk.skipped],
        "pixel_sum": [int(h @ values) for h in hist],
        "pixel_sumsq": [int(h @ values**2) for h in hist],
        "pixels_per_channel": int(chunk.images[:, 0].size) if n else 0,
    }


def _write_chunk(fs: pafs.FileSystem, path: str, chunk: Chunk, meta: dict[str, Any]) -> None:
    n = len(chunk.ids)
    flat = np.ascontiguousarray(chunk.images).reshape(n, -1) if n else np.zeros((0, 0), np.uint8)
    size = flat.shape[1]
    images = pa.Array.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(np.arange(n + 1, dtype=np.int32) * size), pa.py_buffer(flat.tobytes())]
    )
    labels = pa.array(chunk.labels if chunk.labels is not None else [None] * n, type=pa.int64())
    table = pa.table([pa.array(chunk.ids, pa.string()), images, labels], schema=SCHEMA).replace_schema_metadata(
        {_META: json.dumps(meta, sort_keys=True).encode()}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP, compression="zstd", write_statistics=["id", "label"])
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    _write_atomic(fs, path, sink.getvalue().to_pybytes())


def _file_meta(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    return json.loads(pq.read_schema(fs.open_input_file(path)).metadata[_META])


def _finish(src: PackSource, fs: pafs.FileSystem, base: str, out: str, spec: dict, files: dict) -> dict[str, Any]:
    metas = {s: [_file_meta(fs, f"{base}/{name}") for name in names] for s, names in files.items()}
    rows = {
        s: [pq.read_metadata(fs.open_input_file(f"{base}/{name}")).num_rows for name in names]
        for s, names in files.items()
    }
    shapes = {tuple(m["shape"]) for ms in metas.values() for m in ms if m["shape"]}
    if not shapes:
        raise UserError(f"{src.name} has no images to pack (or every image was skipped): check the source")
    if len(shapes) > 1:
        raise UserError(
            f"images differ in size ({', '.join(sorted(_hw(s) for s in shapes))}): pass --resize N (or HxW)"
        )
    (shape,) = shapes
    if src.mean_std is not None:
        mean, std = src.mean_std
    else:
        mean, std = _mean_std(metas["train"], shape[0])
    skipped = [s for ms in metas.values() for m in ms for s in m["skipped"]]
    if skipped:
        lines = ["name,reason"] + [_csv_line(name, why) for name, why in skipped]
        _write_atomic(fs, f"{base}/{SKIPPED_CSV}", ("\n".join(lines) + "\n").encode())
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
        "splits": {s: {"rows": sum(rows[s]), "files": files[s], "file_rows": rows[s]} for s in files},
        "skipped_images": len(skipped),
        "pack": spec,
    }
    _write_atomic(fs, f"{base}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    log(f"packed {src.name}: " + ", ".join(f"{s} {sum(rows[s])} rows" for s in files) + f" -> {out}")
    return manifest


def _mean_std(metas: list[dict[str, Any]], channels: int) -> tuple[list[float], list[float]]:
    """Channel mean and (unbiased) std of pixels / 255 from the files' exact integer sums."""
    s = [0] * channels
    q = [0] * channels
    n = 0
    for m in metas:
        if m["pixel_sum"]:
            s = [a + b for a, b in zip(s, m["pixel_sum"], strict=True)]
            q = [a + b for a, b in zip(q, m["pixel_sumsq"], strict=True)]
            n += m["pixels_per_channel"]
    mean = [si / n / 255 for si in s]
    std = [max((qi - si * si / n) / max(n - 1, 1), 0.0) ** 0.5 / 255 for si, qi in zip(s, q, strict=True)]
    return mean, std


def _csv_line(*cells: str) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(cells)
    return buf.getvalue()


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    if not _exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader (or a resumed pack) never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


# -- sources ------------------------------------------------------------------------------------
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


def open_source(
    source: str, resize: tuple[int, int] | None, skip_bad: bool, channels: int, data_dir: str | None
) -> PackSource:
    kind, _, arg = source.partition(":")
    # --skip-bad-images is not part of what identifies a pack: a re-run adding it resumes the same files
    options = {"source": source, "resize": list(resize) if resize else None, "channels": channels}
    if kind in ("fashion_mnist", "cifar10") and not arg:
        if resize is not None:
            raise UserError(f"--resize is for image files; {kind} is packed as it is: drop --resize")
        return _builtin(kind, data_dir, {"source": source})
    if kind not in ("imagefolder", "folder", "csv") or not arg:
        raise UserError(f"unknown pack source {source!r}: choose one of {', '.join(SOURCES)}")
    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"pack source {path} does not exist: check the path")
    options["source"] = f"{kind}:{path.resolve()}"
    decode = _FileDecoder(resize, skip_bad, channels)
    if kind == "imagefolder":
        return _imagefolder(path, decode, options)
    if kind == "folder":
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}): check the path")
        items: list[tuple[str, str, int | None]] = [(str(path / f), f, None) for f in files]
        return PackSource(f"folder:{path.name}", {"train": decode.split(items)}, None, None, False, options)
    return _csv(path, decode, options)


def _builtin(name: str, data_dir: str | None, options: dict[str, Any]) -> PackSource:
    import torch

    from fm_ray.config import DataConfig
    from fm_ray.data.builtin import load_dataset

    data = load_dataset(DataConfig(dataset=name, data_dir=data_dir))

    def split(prefix: str, x: torch.Tensor, y: torch.Tensor) -> Split:
        def read(a: int, b: int) -> Chunk:
            return Chunk([f"{prefix}/{i}" for i in range(a, b)], y[a:b].tolist(), x[a:b].numpy())

        return Split(len(x), read)

    if name == "fashion_mnist":
        from torchvision.datasets import FashionMNIST

        classes = list(FashionMNIST.classes)
    else:
        classes = list(CIFAR10_CLASSES)
    splits = {"train": split("train", data.train_x, data.train_y), "test": split("test", data.test_x, data.test_y)}
    return PackSource(name, splits, classes, (list(data.mean), list(data.std)), data.augment, options)


def _imagefolder(path: Path, decode: _FileDecoder, options: dict[str, Any]) -> PackSource:
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if not (path / "train").is_dir():
        raise UserError(
            f"imagefolder {path} needs a train/ folder (and optionally test/) with one sub-folder per class"
        )
    classes = sorted(e.name for e in os.scandir(path / "train") if e.is_dir())
    if not classes:
        raise UserError(f"imagefolder {path}/train has no class sub-folders: put each class's images in its own folder")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "test"):
        if not (path / split).is_dir():
            continue
        extra = sorted({e.name for e in os.scandir(path / split) if e.is_dir()} - set(classes))
        if extra:
            raise UserError(
                f"{path}/{split} has classes not in train/: {', '.join(extra)}: add them to train/ or remove them"
            )
        samples = make_dataset(str(path / split), index, extensions=IMG_EXTENSIONS)  # ImageFolder's order
        items = [(p, Path(p).relative_to(path).as_posix(), y) for p, y in samples]
        splits[split] = decode.split(items)
    return PackSource(f"imagefolder:{path.name}", splits, classes, None, True, options)


def _csv(path: Path, decode: _FileDecoder, options: dict[str, Any]) -> PackSource:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise UserError(f"{path} needs a header with a `path` column (optional `label`, `split`): add it")
    seen: set[str] = set()
    for r in rows:
        if r["path"] in seen:
            raise UserError(f"{path} lists {r['path']} twice: ids (the paths) must be unique; remove the duplicate row")
        seen.add(r["path"])
    labeled = "label" in rows[0]
    names = sorted({r["label"] for r in rows}) if labeled else []
    numeric = labeled and all(n.strip().lstrip("-").isdigit() for n in names)
    classes = [str(i) for i in range(max(int(n) for n in names) + 1)] if numeric else names
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[tuple[str, str, int | None]]] = {}
    for r in rows:
        split = (r.get("split") or "train").strip()
        if split not in ("train", "test"):
            raise UserError(f"{path}: split {split!r} for {r['path']}: use train or test")
        label = (int(r["label"]) if numeric else index[r["label"]]) if labeled else None
        splits.setdefault(split, []).append((str(path.parent / r["path"]), r["path"], label))
    if "train" not in splits:
        raise UserError(f"{path} has no train rows: mark some rows split=train (or drop the split column)")
    return PackSource(
        f"csv:{path.stem}",
        {s: decode.split(items) for s, items in splits.items()},
        classes or None,
        None,
        True,
        options,
    )


class _FileDecoder:
    """Decodes image files in parallel with Ray Data; a source split becomes a `Split` of files."""

    def __init__(self, resize: tuple[int, int] | None, skip_bad: bool, channels: int):
        self.resize, self.skip_bad, self.channels = resize, skip_bad, channels

    def split(self, items: list[tuple[str, str, int | None]]) -> Split:
        """items: (file path, id, label or None) in the source's order."""
        return Split(len(items), lambda a, b: self.decode(items[a:b]))

    def decode(self, items: list[tuple[str, str, int | None]]) -> Chunk:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # fm_ray.log.progress draws one bar per file instead
        rows = [{"seq": i, "path": p, "id": name} for i, (p, name, _) in enumerate(items)]
        ds = ray.data.from_items(rows).map_batches(
            decode_batch,  # type: ignore[arg-type]  # ray's stub types the UDF without the fn_kwargs it gets
            batch_size=64,
            batch_format="pyarrow",
            fn_kwargs={"resize": self.resize, "channels": self.channels},
        )
        out = sorted(ds.take_all(), key=lambda r: r["seq"])
        ids: list[str] = []
        labels: list[int | None] = []
        images: list[np.ndarray] = []
        skipped: list[tuple[str, str]] = []
        for r, (_, name, label) in zip(out, items, strict=True):
            if r["why"] is not None:
                if not self.skip_bad:
                    raise BadImage(r["path"], r["why"])
                skipped.append((name, r["why"]))
                continue
            image = np.frombuffer(r["image"], dtype=np.uint8).reshape(r["c"], r["h"], r["w"])
            if images and image.shape != images[0].shape:
                raise UserError(
                    f"images differ in size: {r['path']} is {_hw(image.shape)}, {ids[0]} is {_hw(images[0].shape)}: "
                    "pass --resize N (or HxW) to pack them at one size"
                )
            ids.append(name)
            labels.append(label)
            images.append(image)
        stacked = np.stack(images) if images else np.zeros((0, 0, 0, 0), np.uint8)
        has_labels = any(lab is not None for lab in labels)
        # a source labels every row or none (see _csv, _imagefolder): all set when any is
        return Chunk(ids, cast("list[int]", labels) if has_labels else None, stacked, skipped)


def decode_batch(batch: pa.Table, resize: tuple[int, int] | None, channels: int) -> pa.Table:
    """Ray Data UDF: files -> raw uint8 images, or the reason one cannot be decoded (never raises for it)."""
    out: dict[str, list[Any]] = {k: [] for k in ("seq", "path", "image", "c", "h", "w", "why")}
    for seq, path in zip(batch.column("seq").to_pylist(), batch.column("path").to_pylist(), strict=True):
        image, why = None, None
        try:
            x = decode_image_bytes(Path(path).read_bytes(), path, channels)
            image = x if resize is None else resize_image(x, resize)
        except BadImage as e:
            why = e.why
        except OSError as e:
            why = f"unreadable: {e.strerror or type(e).__name__}"
        out["seq"].append(seq)
        out["path"].append(path)
        out["image"].append(image.numpy().tobytes() if image is not None else None)
        for k, v in zip(("c", "h", "w"), image.shape if image is not None else (0, 0, 0), strict=True):
            out[k].append(int(v))
        out["why"].append(why)
    return pa.table(out, schema=pa.schema([("seq", pa.int64()), ("path", pa.string()), ("image", pa.binary()),
                                           ("c", pa.int32()), ("h", pa.int32()), ("w", pa.int32()), ("why", pa.string())]))  # fmt: skip


def resize_image(x_C_H_W: Any, size: tuple[int, int]) -> Any:
    """Bilinear, antialiased resize of one uint8 image (deterministic on CPU)."""
    import torch

    if tuple(x_C_H_W.shape[1:]) == size:
        return x_C_H_W
    y = torch.nn.functional.interpolate(
        x_C_H_W[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return y[0].round().clamp(0, 255).to(torch.uint8)
