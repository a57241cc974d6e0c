"""Deciding whether downloaded bytes are a photo worth storing (Pillow full decode).

Rejections carry a short reason code that lands in ``crawl_failures.reason``.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

ACCEPTED_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
IMAGE_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                       "gif": "image/gif"}


# Reasons that describe the bytes themselves (as opposed to the transfer).
CONTENT_REJECTIONS = frozenset({"empty_image", "image_too_large", "wrong_content_type", "not_image",
                                "truncated_image", "corrupt_image", "unsupported_format"})


class ImageRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ValidImage:
    sha256: str
    format: str  # jpeg | png | webp | gif
    width: int
    height: int
    size_bytes: int


def validate_image(body: bytes, content_type: str | None, *, max_pixels: int,
                   max_bytes: int) -> ValidImage:
    """The image's facts, or :class:`ImageRejected` saying why these bytes are not stored."""
    if not body:
        raise ImageRejected("empty_image", "zero-byte body")
    if len(body) > max_bytes:
        raise ImageRejected("image_too_large", f"{len(body)} bytes > max_image_bytes {max_bytes}")
    ctype = (content_type or "").split(";")[0].strip().lower()
    if not ctype.startswith("image/"):
        raise ImageRejected("wrong_content_type", f"Content-Type {ctype or 'missing'!r}")
    try:
        with Image.open(io.BytesIO(body)) as img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageRejected("not_image", f"declares {width}x{height}")
            # Checked from the header, before decoding: a decompression bomb never gets inflated.
            if width * height > max_pixels:
                raise ImageRejected("image_too_large",
                                    f"{width}x{height} > max_image_pixels {max_pixels}")
            fmt = ACCEPTED_FORMATS.get(img.format or "")
            if fmt is None:
                raise ImageRejected("unsupported_format", f"format {img.format!r}")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()  # full decode: a cut-off file fails here, not in a later stage
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected("not_image", f"{exc}; starts {body[:16]!r}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("image_too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        reason = "truncated_image" if "truncated" in text or isinstance(exc, EOFError) else "corrupt_image"
        raise ImageRejected(reason, text) from None
    return ValidImage(sha256=hashlib.sha256(body).hexdigest(), format=fmt, width=width,
                      height=height, size_bytes=len(body))
