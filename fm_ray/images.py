"""Decoding image files and bytes into uint8 tensors, with one clear error per bad image.

Every reader of user images (ImageFolder decoding, `fm-ray pack`, folders of unlabeled images) goes
through `decode_image_bytes`, so an empty, truncated, corrupt or unsupported file is reported the
same way everywhere: by name, with the fix.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from fm_ray.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class BadImage(UserError):
    """An image that cannot be decoded; `name` is the file (or pool id) it came from."""

    def __init__(self, name: str, why: str):
        super().__init__(
            f"image {name} cannot be decoded ({why}): replace or remove it, or pass --skip-bad-images to drop it"
        )
        self.name = name
        self.why = why


def decode_image_bytes(data: bytes, name: str, channels: int | None = None) -> torch.Tensor:
    """Encoded image bytes -> uint8 (channels, H, W).

    Args:
        data: the encoded file (PNG, JPEG, ...).
        name: what to call it in an error (a path or a pool id).
        channels: 1 (grey) or 3 (RGB) to convert; None keeps grey as 1 channel and everything else RGB.
    """
    if not data:
        raise BadImage(name, "empty file")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode fully now: a truncated file fails here, not later
            mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if im.mode in ("1", "L", "I;16", "I") else "RGB")
            arr = torch.frombuffer(bytearray(im.convert(mode).tobytes()), dtype=torch.uint8)
            w, h = im.size
    except UnidentifiedImageError:
        raise BadImage(name, "not an image of a supported type") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL reports truncation and corruption as these
        raise BadImage(name, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else 'corrupt'}") from None
    c = 1 if mode == "L" else 3
    return arr.view(h, w, c).permute(2, 0, 1).contiguous()


def decode_image_file(path: str | Path, channels: int | None = None) -> torch.Tensor:
    """A file on disk -> uint8 (channels, H, W); unreadable files are a `BadImage` naming the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(str(path), f"unreadable: {e.strerror or type(e).__name__}") from None
    return decode_image_bytes(data, str(path), channels)
