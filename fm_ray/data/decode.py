"""The one decoder: image files and bytes -> uint8 tensors, with one clear error per bad image.

Every reader of user images (`fm-ray run` on image folders, `fm-ray pack` on Ray Data, projects,
`fm_ray.select`) goes through `decode_file_or_reason` and `collect`, so an empty, truncated, corrupt
or unsupported file is reported the same way everywhere (by name, with the fix), --skip-bad-images
drops it the same way, and images of another size are refused the same way.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fm_ray.data.core import size_mismatch
from fm_ray.errors import UserError

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


def grey_only(paths: Sequence[str]) -> bool:
    """Whether every readable image among `paths` is grey, from the file headers (nothing decoded):
    the one channel rule is grey stays grey (1 channel) when every image is, else RGB."""
    for path in paths:
        try:
            with Image.open(path) as im:
                if im.mode not in GREY_MODES:
                    return False
        except Exception:  # unreadable or not an image: the decoder reports it, it decides nothing here
            continue
    return True


def same_channels(images: Sequence[torch.Tensor | str]) -> list[torch.Tensor | str]:
    """The channel rule on decoded images: any RGB image makes every grey one RGB (its value repeated
    in 3 channels, exactly PIL's L -> RGB)."""
    if not any(isinstance(x, torch.Tensor) and x.shape[0] == 3 for x in images):
        return list(images)
    return [x.expand(3, -1, -1).contiguous() if isinstance(x, torch.Tensor) and x.shape[0] == 1 else x for x in images]


def decode_file_or_reason(
    path: str, channels: int | None = None, resize: tuple[int, int] | None = None
) -> torch.Tensor | str:
    """A file -> uint8 (channels, H, W), optionally resized; or why it cannot be decoded (never raises
    for a bad image: the caller decides, through `collect`, whether that is an error)."""
    try:
        image = decode_image_file(path, channels)
    except BadImage as e:
        return e.why
    return image if resize is None else resize_image(image, resize)


@dataclass
class Collected:
    """The images that decoded, in listing order, and the ones --skip-bad-images dropped."""

    images: list[torch.Tensor] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # listing positions of `images`
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def collect(names: Sequence[str], decoded: Sequence[torch.Tensor | str], skip_bad: bool) -> Collected:
    """Apply the one rule to decoded files: a bad image is an error (or dropped and listed with
    --skip-bad-images); every image must have the first one's size."""
    out = Collected()
    for i, (name, image) in enumerate(zip(names, decoded, strict=True)):
        if isinstance(image, str):
            if not skip_bad:
                raise BadImage(name, image)
            out.skipped.append((name, image))
            continue
        if out.images and image.shape != out.images[0].shape:
            raise size_mismatch(names[out.kept[0]], out.images[0].shape, name, image.shape)
        out.images.append(image)
        out.kept.append(i)
    return out


def resize_image(x_C_H_W: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of one uint8 image (deterministic on CPU)."""
    if tuple(x_C_H_W.shape[1:]) == size:
        return x_C_H_W
    y = torch.nn.functional.interpolate(
        x_C_H_W[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return y[0].round().clamp(0, 255).to(torch.uint8)
