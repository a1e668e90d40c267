"""The one lister of image files: the same rule for hidden entries and for non-images everywhere.

Rules (`fm-ray run`, `fm-ray pack`, projects and `fm_ray.select` all list through here):
- an entry whose name starts with "." (a file or a folder, e.g. `.ipynb_checkpoints`, `.DS_Store`) is
  not part of the dataset, at any depth, and a hidden folder is never a class;
- a file whose suffix is not an image suffix (`IMAGE_SUFFIXES`) is not an image: it is left out and
  counted, and the caller logs one line naming the first few (never silently);
- a file whose name is not UTF-8 is refused in one line naming it (ids are written as UTF-8 text);
- a file with an image suffix is an image: if it cannot be decoded that is a `BadImage` (an error,
  or dropped and listed with --skip-bad-images), never skipped quietly.
Order: sorted by relative path (folders walked in sorted order), torchvision ImageFolder's order.
Paths are strings: pathlib costs seconds on 60,000 files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fm_ray.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def check_utf8(path: str) -> None:
    """A file name that is not UTF-8 (Python holds it with surrogate escapes) cannot be an id in
    batch.csv, tasks.json or a packed pool: one UserError naming it, in every command alike."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = repr(os.fsencode(path))[2:-1]  # the bytes, printable whatever the console's encoding
        raise UserError(
            f"file name {shown} is not UTF-8: rename it to UTF-8 (e.g. `convmv -f latin1 -t utf8 --notest -r "
            "FOLDER`) or move it out of the folder"
        ) from None


@dataclass
class Listed:
    """Image files under one folder: absolute paths and their ids (paths relative to `base`)."""

    paths: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)  # relative paths of files left out


def list_images(folder: Path | str, base: Path | str | None = None) -> Listed:
    """Every image under `folder` (recursive, links followed), ids relative to `base` (default `folder`)."""
    folder, base = str(folder), str(base if base is not None else folder)
    skip = len(base.rstrip(os.sep)) + 1
    walked = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        walked.append((here, sorted(f for f in files if not is_hidden(f))))
    out = Listed()
    for here, files in sorted(walked):
        for f in files:
            path = os.path.join(here, f)
            check_utf8(path)
            if is_image_name(f):
                out.paths.append(path)
                out.ids.append(path[skip:].replace(os.sep, "/"))
            else:
                out.not_images.append(path[skip:].replace(os.sep, "/"))
    return out


def class_folders(split: Path) -> list[str]:
    """A split's class folders, sorted; hidden folders are not classes."""
    if not split.is_dir():
        raise UserError(f"{split} is not a folder: create it with one sub-folder per class")
    return sorted(e.name for e in os.scandir(split) if e.is_dir() and not is_hidden(e.name))


def not_images_note(where: str, names: list[str]) -> str | None:
    """The one line to log about files that are not images, or None when there are none."""
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{where}: left out {len(names)} file(s) that are not images ({shown}); images end in {', '.join(IMAGE_SUFFIXES)}"
