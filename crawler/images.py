"""Deciding whether downloaded bytes are a photo worth storing.

What the crawler decides here: the response must be served as an image and be one of the formats
it stores. The bytes themselves are judged by the one core decoder (:mod:`shoplens.photos`: byte
and pixel caps before decoding, full decode, EXIF orientation), whose refusals carry the short
reason codes that land in ``crawl_failures.reason``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shoplens.photos import PhotoLimits, PhotoRejected, check_bytes, decode_photo

# Formats the crawler stores (short names of ``shoplens.photos.PHOTO_FORMATS``); a phone's MPO is
# a JPEG and is stored as one, an iPhone's HEIC as itself.
IMAGE_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                       "gif": "image/gif", "heic": "image/heic"}


# Reasons that describe the bytes themselves (as opposed to the transfer).
CONTENT_REJECTIONS = frozenset({"empty_image", "image_too_large", "wrong_content_type", "not_image",
                                "truncated_image", "corrupt_image", "unsupported_format"})

# The core decoder's refusal, under the name the crawler has always raised.
ImageRejected = PhotoRejected


@dataclass(frozen=True)
class ValidImage:
    sha256: str
    format: str  # a key of IMAGE_CONTENT_TYPES
    width: int  # upright (EXIF orientation applied), as every later stage sees the photo
    height: int
    size_bytes: int


def validate_image(body: bytes, content_type: str | None, *, max_pixels: int,
                   max_bytes: int) -> ValidImage:
    """The image's facts, or :class:`ImageRejected` saying why these bytes are not stored."""
    limits = PhotoLimits(max_bytes=max_bytes, max_pixels=max_pixels)
    check_bytes(body, limits)  # first: an empty or oversized body is that, whatever its type says
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not ctype.startswith("image/"):
        raise ImageRejected("wrong_content_type", f"Content-Type {ctype or 'missing'!r}")
    photo = decode_photo(body, limits, formats=IMAGE_CONTENT_TYPES)
    return ValidImage(sha256=hashlib.sha256(body).hexdigest(), format=photo.format,
                      width=photo.width, height=photo.height, size_bytes=len(body))
