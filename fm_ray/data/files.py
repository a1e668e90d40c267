"""Sources made of image files: `imagefolder:<root>` (`train/` and `test/` class folders),
`folder:<root>` (unlabeled images, recursive) and `csv:<file>` (a `path` column, optional `label`
and `split` columns).

Each is first *listed* (`list_files`: paths, ids, labels, class names; nothing decoded), which is
what `fm-ray pack` decodes in parallel and what checking a project's import needs; `open_files`
decodes the listing in-process through the decoded cache. Ids are paths relative to the source's
root (the imagefolder root, the folder, or the CSV's folder), the same ids a packed copy has.

Label i is the i-th class name in sorted order, and both ImageFolder splits must hold the same class
names (else test images are scored against another class's index). The decoded cache is keyed by a
hash of every file's id, label and bytes: a replaced image is decoded again whatever its timestamps
say; reading ~60,000 small files costs about a second, a tenth of decoding them.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fm_ray._internal.files import cache_dir, writable_dir, write_atomically
from fm_ray._internal.log import log, progress
from fm_ray.data.core import Dataset, Split, channel_stats, check_square, size_mismatch, tensor_split
from fm_ray.data.decode import collect, decode_file_or_reason, same_channels
from fm_ray.data.labels import check_not_mixed, clean_id, clean_text
from fm_ray.data.listing import class_folders, list_images, not_images_note
from fm_ray.data.normalize import Normalizer
from fm_ray.errors import UserError

CACHE_VERSION = 3  # part of the key: bump it when decoding changes
KINDS = ("imagefolder", "folder", "csv")


@dataclass
class FileSplit:
    """One split's files, in the source's order: absolute paths, ids, labels (None: unlabeled)."""

    paths: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    labels: list[int] | None = None


@dataclass
class Listing:
    kind: str
    root: Path  # ids are relative to it
    splits: dict[str, FileSplit]
    classes: tuple[str, ...] | None
    augment: bool


def list_files(kind: str, arg: str, required_classes: tuple[str, ...] | None = None) -> Listing:
    """The files of an `imagefolder:`, `folder:` or `csv:` source, checked, nothing decoded."""
    path = Path(arg).expanduser()
    if not path.exists():
        raise UserError(f"{kind} source {path} does not exist: check the path")
    path = path.resolve()
    if kind == "imagefolder":
        return _imagefolder(path, required_classes)
    if kind == "folder":
        return _folder(path)
    return _csv(path)


def _imagefolder(root: Path, required: tuple[str, ...] | None) -> Listing:
    if not (root / "train").is_dir():
        raise UserError(
            f"imagefolder {root} needs a train/ folder (and test/ to evaluate on) with one sub-folder per class: "
            "create them"
        )
    classes = class_folders(root / "train")
    if len(classes) < 2:
        raise UserError(
            f"imagefolder {root}: train/ has {len(classes)} class folder(s) {classes}: "
            "a classifier needs at least 2, one sub-folder per class"
        )
    if required is not None and tuple(classes) != required:
        raise UserError(f"{root} has classes {_names(classes)}, not {list(required)}: name the class folders like that")
    splits = {}
    for name in ("train", "test"):
        if not (root / name).is_dir():
            continue
        found = class_folders(root / name)
        if found != classes:
            only_train, only_test = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            raise UserError(
                f"imagefolder {root}: train/ classes {_names(classes)} and {name}/ classes {_names(found)} differ "
                f"(only in train: {only_train}, only in {name}: {only_test}): give both splits the same class folders"
            )
        split = FileSplit(labels=[])
        left_out: list[str] = []
        for label, cls in enumerate(classes):
            listed = list_images(root / name / cls, base=root)
            if not listed.paths:
                raise UserError(
                    f"class folder {root / name / cls} holds no images: add its images or delete the folder"
                )
            split.paths += listed.paths
            split.ids += listed.ids
            split.labels = (split.labels or []) + [label] * len(listed.paths)
            left_out += listed.not_images
        _note(f"imagefolder {root / name}", left_out)
        splits[name] = split
    return Listing("imagefolder", root, splits, tuple(classes), augment=True)


def _folder(root: Path) -> Listing:
    if not root.is_dir():
        raise UserError(f"folder {root} is not a folder: give folder:<a folder of images>")
    listed = list_images(root)
    _note(f"folder {root}", listed.not_images)
    if len(listed.paths) < 2:
        raise UserError(f"folder {root} holds {len(listed.paths)} image(s): add images (at least 2)")
    return Listing("folder", root, {"train": FileSplit(listed.paths, listed.ids, None)}, None, augment=False)


def _csv(path: Path) -> Listing:
    """`path` (relative to the CSV's folder), optional `label` (a class name, or an index when every
    label is `[0-9]+`) and `split` (train | test) columns; labels and ids as `data.labels` defines them."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [(h or "").strip() for h in reader.fieldnames or []]
            rows = [{(k or "").strip(): v or "" for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}): give a UTF-8 CSV file") from None
    except csv.Error as e:  # e.g. a cell over the csv module's 131,072 characters
        raise UserError(f"{path} line {reader.reader.line_num}: not a CSV line ({e}): fix or remove the line") from None
    if "path" not in fields:
        raise UserError(f"{path} needs a header with a `path` column (optional `label`, `split`): add it")
    if not rows:
        raise UserError(f"{path} lists no images: add rows")
    labeled = "label" in fields
    _check_csv_rows(path, rows, labeled)
    names = sorted({r["label"] for r in rows}) if labeled else []
    numeric = labeled and check_not_mixed(
        [r["label"] for r in rows], [f"{path} line {n + 2}" for n in range(len(rows))]
    )
    classes = tuple(str(i) for i in range(max(int(n) for n in names) + 1)) if numeric else tuple(names)
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, FileSplit] = {}
    for r in rows:
        split = r.get("split") or "train"
        if split not in ("train", "test"):
            raise UserError(f"{path}: split {split!r} for {r['path']}: use train or test")
        part = splits.setdefault(split, FileSplit(labels=[] if labeled else None))
        part.paths.append(str(path.parent / r["file"]))
        part.ids.append(r["path"])
        if part.labels is not None:
            part.labels.append(int(r["label"]) if numeric else index[r["label"]])
    if "train" not in splits:
        raise UserError(f"{path} has no train rows: mark some rows split=train (or drop the split column)")
    return Listing("csv", path.parent, splits, classes or None, augment=True)


def _check_csv_rows(path: Path, rows: list[dict[str, str]], labeled: bool) -> None:
    """Each row's `path` -> its id (normalized, `file` keeps it as written), its label checked
    (`data.labels`): one UserError naming the line for an empty, invisible or repeated entry."""
    seen: dict[str, tuple[int, dict[str, str]]] = {}
    for line, r in enumerate(rows, start=2):
        where = f"{path} line {line}"
        if not r["path"].strip():
            raise UserError(f"{where}: empty path: fill it in or remove the line")
        r["file"], r["path"] = r["path"], clean_id(r["path"], where)
        if labeled and not r["label"].strip():
            raise UserError(
                f"{where}: {r['path']} has an empty label: give its class, or drop the label column "
                "for an unlabeled pool"
            )
        if labeled:
            r["label"] = clean_text(r["label"], where)
        if r.get("split"):
            r["split"] = r["split"].strip()
        if r["path"] in seen:
            first, before = seen[r["path"]]
            labels = f" with labels {before['label']!r} and {r['label']!r}" if labeled else ""
            raise UserError(
                f"{path} lists {r['path']} twice, lines {first} and {line} ({before['file']!r}, {r['file']!r})"
                f"{labels}: ids (the paths) must be unique; remove one row"
            )
        seen[r["path"]] = (line, r)


def _note(where: str, left_out: list[str]) -> None:
    note = not_images_note(where, left_out)
    if note:
        log(note)


def _names(names: list[str], most: int = 20) -> str:
    return str(names) if len(names) <= most else f"{names[:most]} ... ({len(names)} in all)"


# -- decoding through the cache ----------------------------------------------------------------
@dataclass(frozen=True)
class Decoded:
    """One decoded split: rows of `x` are the listing's files minus the ones skipped."""

    x: torch.Tensor  # uint8 (N, C, H, W): C = 1 when every image is grey, else 3
    kept: torch.Tensor  # int64 (N,) listing positions of the rows
    skipped: tuple[tuple[str, str], ...]  # (file, why) of the images --skip-bad-images dropped


def open_files(
    listing: Listing,
    name: str,
    skip_bad: bool,
    norm: Normalizer | None = None,
) -> Dataset:
    """Decode a listing's splits (through the cache); normalization from the train pixels unless given."""
    splits: dict[str, Split] = {}
    skipped: list[tuple[str, str]] = []
    for split_name, files in listing.splits.items():
        dec = decode_cached(listing.root, split_name, files, skip_bad)
        keep = dec.kept.tolist()
        labels = None if files.labels is None else torch.tensor(files.labels, dtype=torch.long)[dec.kept]
        ids = [files.ids[i] for i in keep]
        splits[split_name] = tensor_split(ids, labels, dec.x, [files.paths[i] for i in keep])
        skipped += dec.skipped
    train, test = splits["train"], splits.get("test")
    x_train = train.images.read(torch.arange(len(train)).numpy())
    if test is not None and tuple(test.images.shape) != tuple(train.images.shape):
        raise size_mismatch(train.ids[0], train.images.shape, test.ids[0], test.images.shape)
    check_square(name, train.images.shape, train.ids[0])
    norm = norm or Normalizer(*channel_stats(x_train))
    return Dataset(name, train, test, listing.classes, norm, listing.augment, tuple(skipped), str(listing.root))


def decode_cached(root: Path, split: str, files: FileSplit, skip_bad: bool) -> Decoded:
    """Decode one split's files, or load the decode of exactly these bytes from the cache."""
    encoded = [_read(p) for p in files.paths]  # bytes, or why the file is unreadable
    cache = cache_dir() / "decoded"
    # <split>-<folder hash>-<contents hash>.pt: one entry per folder and split, older ones removed
    folder = f"{split}-{hashlib.blake2b(str(root).encode(), digest_size=6).hexdigest()}"
    key = hashlib.blake2b(f"v{CACHE_VERSION}".encode(), digest_size=16)
    labels = files.labels if files.labels is not None else [None] * len(files.ids)
    for sid, label, data in zip(files.ids, labels, encoded, strict=True):
        key.update(repr((sid, label, len(data), isinstance(data, str))).encode())
        key.update(data.encode() if isinstance(data, str) else data)
    cached = cache / f"{folder}-{key.hexdigest()}.pt"
    found = _load(cached, len(files.ids))
    if found is None:
        writable_dir(cache)  # fail before the long decode, not after it
        found = _decode(root / split if (root / split).is_dir() else root, files, encoded)
        blob = {"x": found.x, "kept": found.kept, "skipped": [list(s) for s in found.skipped]}
        write_atomically(cached, lambda f: torch.save(blob, f))
        for older in cache.glob(f"{folder}-*.pt"):  # decodes of files since replaced
            if older != cached:
                older.unlink(missing_ok=True)
    if found.skipped and not skip_bad:  # cached by a run with --skip-bad-images
        from fm_ray.data.decode import BadImage

        raise BadImage(*found.skipped[0])
    return found


def _read(path: str) -> bytes | str:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or type(e).__name__}"


def _decode(where: Path, files: FileSplit, encoded: list[bytes | str]) -> Decoded:
    """Decode every file (bad ones recorded, not raised: the cache keeps them for --skip-bad-images)."""
    from fm_ray.data.decode import BadImage, decode_image_bytes

    log(f"decoding {len(files.paths)} images under {where} (cached for the next run)")
    decoded: list[torch.Tensor | str] = []
    for path, data in progress(zip(files.paths, encoded, strict=True), f"decoding {where.name}", len(files.paths)):
        if isinstance(data, str):
            decoded.append(data)
            continue
        try:
            decoded.append(decode_image_bytes(data, path))  # grey stays grey, anything else RGB ...
        except BadImage as e:
            decoded.append(e.why)
    got = collect(files.paths, same_channels(decoded), skip_bad=True)  # ... unless any image is RGB
    if not got.images:
        raise UserError(f"no image under {where} could be decoded ({len(got.skipped)} bad): replace them")
    return Decoded(torch.stack(got.images), torch.tensor(got.kept, dtype=torch.long), tuple(got.skipped))


def _load(path: Path, n_listed: int) -> Decoded | None:
    """The cached split, or None when absent or unreadable (a damaged cache file is decoded again)."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        found = Decoded(blob["x"], blob["kept"], tuple((f, w) for f, w in blob["skipped"]))
        ok = (
            found.x.dtype == torch.uint8
            and found.x.dim() == 4
            and len(found.x) == len(found.kept)
            and len(found.kept) + len(found.skipped) == n_listed
        )
    except Exception as e:  # torch.load reports damage as any of several types
        log(f"decoded cache {path} is unreadable ({type(e).__name__}): decoding again")
        return None
    if not ok:
        log(f"decoded cache {path} has the wrong shape: decoding again")
        return None
    return found


# decode_file_or_reason is the per-file step `fm-ray pack` runs on Ray Data (same decoder, same rule)
__all__ = ["Listing", "FileSplit", "list_files", "open_files", "decode_cached", "decode_file_or_reason", "KINDS"]
