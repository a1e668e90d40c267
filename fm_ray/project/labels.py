"""Labels that come from people: reading annotators' files, checking them, and the project's label store.

Two import formats: a CSV with `id,label` columns, and a Label Studio JSON export (ids from each
task's `data.id`, labels from its single-choice control's results: see `labelstudio`). Every problem is one
`UserError` naming the file and the line (CSV) or task (JSON), and nothing is written unless the
whole file is good. The store is `labels.csv` (`id,label,batch`), rewritten through a temporary file
and a rename, so a crash leaves either the old or the new labels, never half.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fm_ray._internal.files import write_atomically
from fm_ray.data.labels import clean_id, clean_text
from fm_ray.errors import UserError
from fm_ray.project.labelstudio import CONTROL, read_export

__all__ = ["CONTROL", "Label", "read_label_file", "check_labels", "check_store", "read_rows", "write_rows"]

STORE_FIELDS = ("id", "label", "batch")


@dataclass(frozen=True)
class Label:
    id: str
    label: str  # a class name
    where: str  # "file line N" / "file task N": for messages


def read_label_file(path: str | Path) -> list[Label]:
    """Labels in an annotators' file: CSV (`id,label`) or a Label Studio JSON export, by content."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read labels file {path} ({e.strerror}): check the path") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text: save it as UTF-8 CSV or Label Studio JSON") from None
    if text.lstrip().startswith(("[", "{")):
        return _label_studio(text, path)
    return _csv(text, path)


def csv_rows(lines: Iterable[str], path: Path) -> Iterator[list[str]]:
    """`csv.reader` over `lines`; a malformed line (a cell over the csv module's 131,072 characters,
    a NUL byte, a stray quote) is one UserError naming the file and the line, not a `csv.Error`."""
    reader = csv.reader(lines)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{path} line {reader.line_num}: not a CSV line ({e}): fix or remove the line") from None
        yield row


def _csv(text: str, path: Path) -> list[Label]:
    reader = csv_rows(io.StringIO(text), path)
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["id", "label"]:
        raise UserError(f"{path} line 1: expected the header 'id,label', got {','.join(header or [])!r}: add it")
    out = []
    for line, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"{path} line {line}: expected 'id,label', got {','.join(row)!r}: fix or remove the line")
        where = f"{path} line {line}"
        out.append(Label(clean_id(row[0], where), clean_text(row[1], where), where))
    return out


def _label_studio(text: str, path: Path) -> list[Label]:
    return [
        Label(clean_id(sid, where), clean_text(label, where), where) for sid, label, where in read_export(text, path)
    ]


def check_labels(
    labels: Iterable[Label], known: dict[str, str], ids: set[str] | None, classes: list[str]
) -> dict[str, str]:
    """The new (id -> class) pairs of `labels`, after checking every one; raises on the first problem.

    Args:
        labels: what the file says.
        known: labels the project already has; repeating one is fine (re-import), contradicting it is not.
        ids: the pool's ids (None: skip the check).
        classes: the project's class names.
    """
    new: dict[str, str] = {}
    for lab in labels:
        if ids is not None and lab.id not in ids:
            raise UserError(f"{lab.where}: unknown id {lab.id!r}: not in the project's pool (ids are as in batch.csv)")
        if lab.label not in classes:
            raise UserError(
                f"{lab.where}: unknown class {lab.label!r} for id {lab.id!r}: use one of {', '.join(classes)}"
            )
        before = known.get(lab.id, new.get(lab.id))
        if before is not None and before != lab.label:
            raise UserError(
                f"{lab.where}: id {lab.id!r} is labeled {lab.label!r} but already {before!r}: fix the file "
                "(fm_ray keeps the first label)"
            )
        if lab.id not in known:
            new[lab.id] = lab.label
    return new


def check_store(rows: list[dict[str, str]], path: Path, classes: list[str]) -> dict[str, str]:
    """The project's labels.csv rows as id -> class. One rule for a hand-edited store, as for an
    import: a repeated row is fine, a row that gives an id another class is an error naming both lines,
    and so is a class the project does not have."""
    found: dict[str, tuple[str, int]] = {}  # id -> (class, first line)
    for line, r in enumerate(rows, start=2):
        sid, lab = r.get("id") or "", r.get("label") or ""
        if not sid or not lab:
            raise UserError(f"{path} line {line}: expected id,label,batch, got {list(r.values())}: fix the line")
        if lab not in classes:
            raise UserError(
                f"{path} line {line}: unknown class {lab!r} for id {sid!r}: use one of {', '.join(classes)} "
                "(fix the line)"
            )
        before = found.setdefault(sid, (lab, line))
        if before[0] != lab:
            raise UserError(
                f"{path} lines {before[1]} and {line} give id {sid!r} two classes, {before[0]!r} and {lab!r}: "
                "delete the wrong line"
            )
    return {sid: lab for sid, (lab, _) in found.items()}


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header (labels.csv, batch.csv); none if it does not exist."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            return list(reader)
        except csv.Error as e:
            raise UserError(
                f"{path} line {reader.reader.line_num}: not a CSV line ({e}): fix or remove the line"
            ) from None


def write_rows(path: Path, rows: list[dict[str, Any]], fields: Sequence[str]) -> None:
    """A CSV file at once, atomically (see `cache.write_atomically`)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(fields))
    w.writeheader()
    w.writerows({k: r[k] for k in fields} for r in rows)
    write_atomically(path, lambda f: f.write(text.getvalue().encode("utf-8")))
