"""Decoding image files and bytes into uint8 tensors, with one clear error per bad image.

Every reader of user images (ImageFolder decoding, `fm-ray pack`, folders of unlabeled images) goes
through `decode_image_bytes`, so an empty, truncated, corrupt or unsupported file is reported the
same way everywhere: by name, with the fix.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fm_ray.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's modes for 16-bit grey (PNG, TIFF)
GREY_MODES = ("1", "L", *SIXTEEN_BIT_MODES)


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
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode fully now: a truncated file fails here, not later
            grey = im.mode in GREY_MODES
            mode = {1: "L", 3: "RGB"}.get(channels or 0) or ("L" if grey else "RGB")
            arr = torch.frombuffer(bytearray(_eight_bit(im, name).convert(mode).tobytes()), dtype=torch.uint8)
            w, h = im.size
    except UnidentifiedImageError:
        raise BadImage(name, "not an image of a supported type") from None
    except BadImage:
        raise
    except Exception as e:  # PIL reports damage as OSError, ValueError, SyntaxError, struct.error, ...
        raise BadImage(name, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else 'corrupt'}") from None
    c = 1 if mode == "L" else 3
    return arr.view(h, w, c).permute(2, 0, 1).contiguous()


def _eight_bit(im: Image.Image, name: str) -> Image.Image:
    """16-bit grey scaled to 8 bits (PIL's own convert clips it at 255: a white image)."""
    if im.mode == "F":
        raise BadImage(name, "floating-point pixels: save it with 8 or 16 bits per channel")
    if im.mode not in SIXTEEN_BIT_MODES:
        return im
    values = np.asarray(im).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise BadImage(name, "pixel values beyond 16 bits: save it with 8 or 16 bits per channel")
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def decode_image_file(path: str | Path, channels: int | None = None) -> torch.Tensor:
    """A file on disk -> uint8 (channels, H, W); unreadable files are a `BadImage` naming the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadImage(str(path), f"unreadable: {e.strerror or type(e).__name__}") from None
    return decode_image_bytes(data, str(path), channels)
