"""Small JPEG thumbnails of stored photos, read from the object store with bounded cost."""
from __future__ import annotations

from shoplens.photos import PhotoLimits, PhotoRejected, thumbnail_jpeg
from shoplens.store import ObjectStore

MIN_SIDE = 32
MAX_SIDE = 256  # the page never needs more; bounds CPU and bytes per request
DEFAULT_SIDE = 128

# The stored object cannot be turned into a thumbnail (too large, not an image): the core
# decoder's refusal.
ThumbnailError = PhotoRejected


def clamp_side(side: int | None) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, side or DEFAULT_SIDE))


def thumbnail_from_store(store: ObjectStore, key: str, stored_size: int, side: int,
                         max_bytes: int, max_pixels: int) -> bytes:
    """Upright JPEG of the stored photo fitted into ``side`` x ``side`` (clamped)."""
    if stored_size > max_bytes:  # refused before the object is fetched
        raise ThumbnailError("image_too_large", f"stored object is {stored_size} bytes, over {max_bytes}")
    return thumbnail_jpeg(store.get_bytes(key), clamp_side(side),
                          PhotoLimits(max_bytes=max_bytes, max_pixels=max_pixels))
