"""What a label and a sample id are, defined once for `csv:` sources, label CSVs and Label Studio exports.

- Text is Unicode NFC: `café` typed on a Mac (NFD) and on Linux (NFC) is one class.
- Invisible characters (format and control characters such as U+200B, U+FEFF), spaces other than
  U+0020 inside, and whitespace around the text are errors naming the row: `dog` + U+200B would be
  an invisible fourth class, `cat ` a second `cat`.
- A label is a class index when it is `[0-9]+` (ASCII digits only: `+1`, `-1`, `²` are not); the
  labels of one file are all indices or all names, never mixed (one `+1` among integers would turn
  every label into a name).
- Ids that are paths are compared normalized: `./a.jpg`, `a.jpg` and `x/../a.jpg` are one sample.
"""

from __future__ import annotations

import posixpath
import re
import unicodedata
from collections.abc import Sequence

from fm_ray.errors import UserError

_INDEX = re.compile(r"[0-9]+")
_INVISIBLE = {"Cf", "Cc", "Co", "Cn", "Zl", "Zp"}  # format, control, private, unassigned, separators


def clean_text(raw: str, where: str, what: str = "label") -> str:
    """`raw` in NFC, or one UserError naming `where` if it is empty, holds an invisible character
    or a space other than U+0020, or has whitespace around it."""
    text = unicodedata.normalize("NFC", raw)
    if not text:
        raise UserError(f"{where}: empty {what}: fill it in or remove the row")
    bad = [c for c in text if unicodedata.category(c) in _INVISIBLE or (c.isspace() and c != " ")]
    if bad:
        codes = ", ".join(dict.fromkeys(f"U+{ord(c):04X}" for c in bad))
        raise UserError(f"{where}: {what} {text!r} holds invisible character(s) {codes}: delete them")
    if text != text.strip():
        raise UserError(f"{where}: {what} {text!r} has whitespace around it: delete it")
    return text


def clean_id(raw: str, where: str) -> str:
    """A sample id (a path relative to its source, or a packed id): clean text, path-normalized."""
    return posixpath.normpath(clean_text(raw, where, "id"))


def is_index(label: str) -> bool:
    return _INDEX.fullmatch(label) is not None


def check_not_mixed(labels: Sequence[str], wheres: Sequence[str]) -> bool:
    """True when every label is a class index (`[0-9]+`), False when none is; mixed is a UserError
    naming the first row of the smaller kind."""
    indices = [is_index(lab) for lab in labels]
    if all(indices) or not any(indices):
        return bool(indices) and all(indices)
    odd = indices.count(True) < len(indices) / 2  # the kind that is the exception
    i = indices.index(odd)
    kind = "an integer label among class names" if odd else "not an integer label ([0-9]+) among integer labels"
    raise UserError(
        f"{wheres[i]}: label {labels[i]!r} is {kind}: labels are all class indices 0, 1, ... or all "
        "class names, never mixed; fix the row"
    )
