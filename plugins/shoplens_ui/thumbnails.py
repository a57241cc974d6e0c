"""Small JPEG thumbnails of stored photos, read from the object store with bounded cost."""
from __future__ import annotations

import io

from PIL import Image, ImageOps

from shoplens.store import ObjectStore

MIN_SIDE = 32
MAX_SIDE = 256  # the page never needs more; bounds CPU and bytes per request
DEFAULT_SIDE = 128


class ThumbnailError(ValueError):
    """The stored object cannot be turned into a thumbnail (too large, not an image)."""


def clamp_side(side: int | None) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, side or DEFAULT_SIDE))


def make_thumbnail(data: bytes, side: int, max_pixels: int) -> bytes:
    """Downscale image bytes to fit ``side`` x ``side``; JPEG out, EXIF orientation applied."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ThumbnailError(f"image is {image.width}x{image.height}, over {max_pixels} pixels")
            image.draft("RGB", (side, side))  # JPEG: decode at reduced scale, far cheaper
            image = ImageOps.exif_transpose(image)
            image.thumbnail((side, side))
            out = io.BytesIO()
            image.convert("RGB").save(out, "JPEG", quality=80)
            return out.getvalue()
    except (OSError, Image.DecompressionBombError) as exc:
        raise ThumbnailError(f"not a readable image: {exc}") from exc


def thumbnail_from_store(store: ObjectStore, key: str, stored_size: int, side: int,
                         max_bytes: int, max_pixels: int) -> bytes:
    if stored_size > max_bytes:
        raise ThumbnailError(f"stored object is {stored_size} bytes, over {max_bytes}")
    return make_thumbnail(store.get_bytes(key), clamp_side(side), max_pixels)
