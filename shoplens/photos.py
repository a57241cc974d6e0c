"""The one photo decoder: photo bytes in, an upright RGB Pillow image out, or ``PhotoRejected``.

Every stage that looks at pixels (crawl validation, dedup hashes, the filter's detector and
statistics, thumbnails, the model) decodes through :func:`decode_photo`, so all of them see the
same picture of the same bytes:

- the byte cap and the pixel cap are checked before any pixel is decoded (the pixel count comes
  from the header, so a decompression bomb is never inflated); Pillow's own bomb check is turned
  into an error as a second line;
- the whole file is decoded (``load``), so a cut-off file fails here and not in a later stage;
- the photo is turned upright by its EXIF orientation (phones store rotation there);
- the mode is normalised to 8-bit RGB: alpha is composited on white, palettes expanded, CMYK and
  16-bit converted, grayscale replicated;
- formats are those phones and shops produce: JPEG, MPO (a phone's multi-picture JPEG: its first
  frame, the photo itself), PNG, WebP, GIF (first frame), HEIC/HEIF (through pillow-heif), plus
  BMP and TIFF for files a person hands to ``predict``.

A refusal is one error type with a short machine reason (the codes the crawler stores in
``crawl_failures.reason``) and a human message.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from shoplens.config import Settings

pillow_heif.register_heif_opener()  # once, here: every decoder in the house is this module

# Bumped whenever the pixels returned for some bytes could change (orientation, mode handling,
# resampling). Stored results computed from decoded pixels (perceptual hashes, detections) carry
# it in their version, so changing it recomputes them.
DECODER_VERSION = "photos-1"

# Pillow's format name -> the short name stored in the manifest. MPO is a JPEG file whose first
# frame is the photo (later frames are previews or depth), so it is stored and served as JPEG.
PHOTO_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif",
                 "HEIF": "heic", "BMP": "bmp", "TIFF": "tiff"}
# Formats whose decoder can scale down while decoding (JPEG DCT scaling), see ``reduce_to``.
_DRAFT_FORMATS = {"JPEG", "MPO"}

REASON_MESSAGES = {
    "empty_image": "empty file",
    "image_too_large": "image too large",
    "wrong_content_type": "not served as an image",
    "not_image": "not a readable image",
    "truncated_image": "image file is cut off",
    "corrupt_image": "image data is corrupt",
    "unsupported_format": "image format not supported",
}

ORIENTATION = 0x0112  # the EXIF tag phones store rotation in
THUMBNAIL_MAX_SIDE = 512  # no caller needs more; bounds the CPU and bytes of one thumbnail
WHITE = (255, 255, 255)


class PhotoRejected(ValueError):
    """These bytes are not a photo shoplens uses; ``reason`` is a key of ``REASON_MESSAGES``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def message(self) -> str:
        """For people: e.g. ``not a readable image (starts b'<html>')``."""
        return f"{REASON_MESSAGES.get(self.reason, self.reason)} ({self.detail})"


@dataclass(frozen=True)
class PhotoLimits:
    """The most bytes and pixels one photo may have (defaults: ``Settings``' defaults)."""

    max_bytes: int = Settings.max_image_bytes
    max_pixels: int = Settings.max_image_pixels

    @classmethod
    def from_settings(cls, settings: Settings) -> "PhotoLimits":
        return cls(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)


DEFAULT_LIMITS = PhotoLimits()


@dataclass(frozen=True)
class Photo:
    image: Image.Image  # upright, mode RGB, fully decoded (smaller than width x height with reduce_to)
    format: str  # a value of PHOTO_FORMATS
    width: int  # upright, at full resolution
    height: int


def check_bytes(data: bytes, limits: PhotoLimits = DEFAULT_LIMITS) -> None:
    """The checks that need no decoding: not empty, not over the byte cap."""
    if not data:
        raise PhotoRejected("empty_image", "zero-byte body")
    if len(data) > limits.max_bytes:
        raise PhotoRejected("image_too_large", f"{len(data)} bytes > max_image_bytes {limits.max_bytes}")


def read_photo_file(path: str | Path, limits: PhotoLimits = DEFAULT_LIMITS) -> bytes:
    """A photo file's bytes; an oversized file is refused from its size, without reading it
    (``OSError`` when the file cannot be read)."""
    size = Path(path).stat().st_size
    if size > limits.max_bytes:
        raise PhotoRejected("image_too_large", f"{size} bytes > max_image_bytes {limits.max_bytes}")
    return Path(path).read_bytes()


def decode_photo(data: bytes, limits: PhotoLimits = DEFAULT_LIMITS, *, reduce_to: int | None = None,
                 formats: Collection[str] | None = None) -> Photo:
    """The upright RGB photo in ``data``, or :class:`PhotoRejected` saying why not.

    ``reduce_to``: the caller only needs the photo fitted into a ``reduce_to`` square, so a JPEG
    may be decoded at a reduced scale that still covers that fit (most of the cost of decoding a
    big photo only to shrink it). ``formats``: short format names accepted (default: all of
    ``PHOTO_FORMATS``); another format is refused before decoding as ``unsupported_format``.
    """
    check_bytes(data, limits)
    with warnings.catch_warnings():
        # Pillow's own bomb check is a second line behind the explicit pixel cap below.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            fmt = PHOTO_FORMATS.get(image.format or "")
            if fmt is None or (formats is not None and fmt not in formats):
                raise PhotoRejected("unsupported_format", f"format {image.format!r}")
            width, height = image.size
            if width <= 0 or height <= 0:
                raise PhotoRejected("not_image", f"declares {width}x{height}")
            # From the header, before decoding: a decompression bomb never gets inflated.
            if width * height > limits.max_pixels:
                raise PhotoRejected("image_too_large",
                                    f"{width}x{height} > max_image_pixels {limits.max_pixels}")
            if reduce_to and image.format in _DRAFT_FORMATS:
                scale = min(reduce_to / width, reduce_to / height)
                if scale < 1:
                    image.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
            image.load()  # full decode (first frame of MPO/GIF): a cut-off file fails here
        except PhotoRejected:
            raise
        except UnidentifiedImageError as exc:
            raise PhotoRejected("not_image", f"{exc}; starts {data[:16]!r}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PhotoRejected("image_too_large", str(exc)) from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types for bad data
            text = str(exc)
            truncated = "truncated" in text or isinstance(exc, EOFError)
            raise PhotoRejected("truncated_image" if truncated else "corrupt_image",
                                f"{type(exc).__name__}: {text}") from None
    loaded = image.size
    image = _upright(image)
    if image.size != loaded and image.size == loaded[::-1]:
        width, height = height, width
    return Photo(image=to_rgb(image), format=fmt, width=width, height=height)


def _upright(image: Image.Image) -> Image.Image:
    try:
        if image.getexif().get(ORIENTATION, 1) not in range(2, 9):
            return image  # already upright: spare exif_transpose's full-size copy
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels unreadable:
        return image  # the photo is then used as stored


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited on white, 16-bit scaled down, everything else by Pillow."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        import numpy as np  # here only: the crawl process validates photos without it (~0.15 s)
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples (PNG, TIFF): keep the top 8 bits, as a viewer shows them.
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
        mode = "L"
    elif mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8))
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def thumbnail_jpeg(data: bytes, side: int, limits: PhotoLimits = DEFAULT_LIMITS,
                   quality: int = 80) -> bytes:
    """JPEG bytes of the upright photo fitted into ``side`` x ``side`` (side capped at
    ``THUMBNAIL_MAX_SIDE``); :class:`PhotoRejected` when the bytes are not a usable photo."""
    side = max(1, min(int(side), THUMBNAIL_MAX_SIDE))
    image = decode_photo(data, limits, reduce_to=side).image
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def encode_jpeg(image: Image.Image, quality: int = 92) -> bytes:
    """JPEG bytes of an RGB image made from a photo (a crop), baseline, no metadata: the same
    pixels and quality always give the same bytes, so their content address is stable."""
    out = io.BytesIO()
    to_rgb(image).save(out, "JPEG", quality=quality, optimize=False, progressive=False)
    return out.getvalue()
