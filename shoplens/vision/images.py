"""Turning photo bytes of any size, orientation and common format into model input.

Photos are decoded by the core decoder (:mod:`shoplens.photos`: JPEG, MPO, PNG, WebP, HEIC, ...,
upright by EXIF orientation, RGB), scaled so the shorter side covers ``margin_size`` and
centre-cropped: training takes random ``size`` crops of that square, evaluation and prediction its
centre crop.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from shoplens.photos import DEFAULT_LIMITS, PhotoLimits, PhotoRejected, decode_photo, read_photo_file

# The square photos are first fitted to: ``size * CROP_MARGIN`` (the usual 256 -> 224 ratio).
CROP_MARGIN = 1.143
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".bmp", ".gif", ".tif", ".tiff"}


class UnreadableImage(ValueError):
    """A named photo (file or stored image) that cannot be read or decoded, with a message for
    people; ``reason`` is the decoder's code (``unreadable_file`` when the file cannot be read)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def margin_size(size: int) -> int:
    return int(round(size * CROP_MARGIN))


def decode(data: bytes, name: str = "image", limits: PhotoLimits = DEFAULT_LIMITS) -> Image.Image:
    """The upright RGB photo (raises :class:`UnreadableImage` naming ``name``)."""
    try:
        return decode_photo(data, limits).image
    except PhotoRejected as exc:
        raise UnreadableImage(f"{name}: {exc.message}", exc.reason) from exc


def fitted_square(img: Image.Image, size: int) -> np.ndarray:
    """uint8 (size, size, 3): the photo scaled to cover the square, centre-cropped."""
    return np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def centre_crop(square: np.ndarray, size: int) -> np.ndarray:
    off = (square.shape[0] - size) // 2
    return square[off:off + size, off:off + size]


def model_input(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """What evaluation and prediction feed a member: the centre ``size`` crop of the margin square."""
    return centre_crop(fitted_square(decode(data, name), margin_size(size)), size)


def read_file(path: str | Path, limits: PhotoLimits = DEFAULT_LIMITS) -> bytes:
    try:
        return read_photo_file(path, limits)
    except PhotoRejected as exc:
        raise UnreadableImage(f"{path}: {exc.message}", exc.reason) from exc
    except OSError as exc:
        raise UnreadableImage(f"{path}: cannot read file ({exc.strerror or exc})", "unreadable_file") from exc


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
