"""Turning photo bytes of any size, orientation and common format into model input.

Photos are decoded with Pillow (JPEG, PNG, WebP, ...), rotated upright by their EXIF orientation,
converted to RGB, scaled so the shorter side covers ``margin_size`` and centre-cropped: training
takes random ``size`` crops of that square, evaluation and prediction its centre crop.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The square photos are first fitted to: ``size * CROP_MARGIN`` (the usual 256 -> 224 ratio).
CROP_MARGIN = 1.143
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class UnreadableImage(ValueError):
    """The bytes are not a photo Pillow can decode."""


def margin_size(size: int) -> int:
    return int(round(size * CROP_MARGIN))


def decode(data: bytes, name: str = "image") -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
        img.load()
    except UnidentifiedImageError as exc:
        raise UnreadableImage(f"{name}: not a readable image (unrecognised or corrupt format)") from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"{name}: not a readable image ({exc})") from exc
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            background = Image.new("RGB", img.size, (255, 255, 255))
            background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
            img = background
        else:
            img = img.convert("RGB")
    return img


def fitted_square(img: Image.Image, size: int) -> np.ndarray:
    """uint8 (size, size, 3): the photo scaled to cover the square, centre-cropped."""
    return np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def centre_crop(square: np.ndarray, size: int) -> np.ndarray:
    off = (square.shape[0] - size) // 2
    return square[off:off + size, off:off + size]


def model_input(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """What evaluation and prediction feed a member: the centre ``size`` crop of the margin square."""
    return centre_crop(fitted_square(decode(data, name), margin_size(size)), size)


def read_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UnreadableImage(f"{path}: cannot read file ({exc.strerror or exc})") from exc


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given; directories replaced by the image files inside them (sorted, recursive)."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(str(f) for f in sorted(path.rglob("*"))
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out
