"""The image CDN's resizing: query parameters -> deterministic image bytes, with an LRU cache.

``w``/``h`` bound the size keeping the aspect ratio (never upscaling), ``c=c`` centre-crops to
exactly w x h after scaling to cover, ``q`` is the JPEG quality, ``webp=1`` converts to WebP.
Parameters that would not change the image give back the original bytes untouched.
"""
from __future__ import annotations

import hashlib
import io
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

from PIL import Image, ImageOps

MAX_SIDE = 10_000  # bounds never upscale, so any bound up to this is cheap
MAX_CROP_SIDE = 2048  # a crop may upscale: keep its cost bounded
DEFAULT_QUALITY = 85


class BadImageParams(ValueError):
    """A resize query the CDN refuses (answered 400)."""


@dataclass(frozen=True)
class ImageParams:
    width: int | None = None
    height: int | None = None
    crop: bool = False
    quality: int = DEFAULT_QUALITY
    webp: bool = False

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> "ImageParams":
        def dimension(name: str) -> int | None:
            raw = query.get(name)
            if raw in (None, ""):
                return None
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_SIDE:
                raise BadImageParams(f"{name} must be an integer 1..{MAX_SIDE}, got {raw!r}")
            return int(raw)

        width, height = dimension("w"), dimension("h")
        crop = query.get("c", "") == "c"
        if crop and not (width or height):
            raise BadImageParams("c=c needs w and/or h")
        if crop:  # a crop with one side given is a square crop
            width, height = width or height, height or width
            if max(width, height) > MAX_CROP_SIDE:
                raise BadImageParams(f"c=c crops are at most {MAX_CROP_SIDE} px a side")
        raw_q = query.get("q", "")
        if raw_q and (not raw_q.isdigit() or not 1 <= int(raw_q) <= 100):
            raise BadImageParams(f"q must be an integer 1..100, got {raw_q!r}")
        quality = int(raw_q) if raw_q else DEFAULT_QUALITY
        webp = query.get("webp", "") in {"1", "true"}
        return cls(width, height, crop, quality, webp)


def sniff_content_type(data: bytes) -> str:
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _target_size(size: tuple[int, int], params: ImageParams) -> tuple[int, int]:
    width, height = size
    if params.crop:
        return params.width, params.height
    scale = min(params.width / width if params.width else 1.0,
                params.height / height if params.height else 1.0, 1.0)
    return max(round(width * scale), 1), max(round(height * scale), 1)


def render(original: bytes, params: ImageParams) -> tuple[bytes, str]:
    """The bytes and Content-Type the CDN serves for ``params`` (same input -> same bytes)."""
    # Pillow directly, not shoplens.photos: the replica plays the shop's own CDN (a third party)
    # re-encoding originals it generated itself; it is not a consumer of crawled photos.
    with Image.open(io.BytesIO(original)) as probe:
        size, fmt = probe.size, probe.format
    format_change = params.webp and fmt != "WEBP"
    if not params.crop and _target_size(size, params) == size and not format_change:
        return original, sniff_content_type(original)
    image = Image.open(io.BytesIO(original))
    if params.crop or _target_size(size, params) != size:
        # JPEG draft decoding (DCT scaling) makes big downscales cheap and stays deterministic.
        image.draft("RGB", _cover_size(size, params) if params.crop else _target_size(size, params))
    image = ImageOps.exif_transpose(image).convert("RGB")
    if params.crop:
        image = ImageOps.fit(image, (params.width, params.height), Image.LANCZOS)
    else:
        target = _target_size(image.size, params)
        if target != image.size:
            image = image.resize(target, Image.LANCZOS)
    out = io.BytesIO()
    if params.webp:
        image.save(out, "WEBP", quality=params.quality, method=4)
        return out.getvalue(), "image/webp"
    image.save(out, "JPEG", quality=params.quality)
    return out.getvalue(), "image/jpeg"


def _cover_size(size: tuple[int, int], params: ImageParams) -> tuple[int, int]:
    scale = max(params.width / size[0], params.height / size[1])
    return max(round(size[0] * scale), 1), max(round(size[1] * scale), 1)


# --- permanently bad photos (--bad-photos) ------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bad_photo_body(kind: str, original: bytes) -> tuple[bytes, str]:
    """Body and Content-Type of a permanently bad photo of the given kind."""
    if kind == "bomb":  # a valid PNG whose header declares 30000 x 30000 pixels
        header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
        row = b"\x00" + b"\x00" * 30000 * 3
        pixels = zlib.compress(row * 8, 9)
        body = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels)
                + _png_chunk(b"IEND", b""))
        return body, "image/png"
    if kind == "not_image":
        return (b"<!DOCTYPE html><html><head><title>Error</title></head><body><h1>Image not "
                b"available</h1></body></html>"), "image/jpeg"
    if kind == "truncated_file":
        jpeg = original
        if not original.startswith(b"\xff\xd8"):
            out = io.BytesIO()
            Image.open(io.BytesIO(original)).convert("RGB").save(out, "JPEG", quality=85)
            jpeg = out.getvalue()
        return jpeg[: len(jpeg) // 2], "image/jpeg"
    if kind == "wrong_type":
        return (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\ntrailer << /Root 1 0 R"
                b" >>\n%%EOF\n"), "text/plain"
    raise ValueError(f"unknown bad photo kind {kind!r}")


def corrupt_body(body: bytes) -> bytes:
    """A JPEG-looking body with broken data (the 'corrupt' fault): header kept, rest scrambled."""
    head = b"\xff\xd8\xff\xe0" + body[4:64]
    scrambled = hashlib.sha256(body[:4096]).digest() * max(len(body) // 64, 4)
    return head + scrambled[: max(len(body) // 2, 256)]


# --- cache -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rendered:
    body: bytes
    content_type: str
    sha256: str


class RenderCache:
    """LRU of rendered bodies bounded in bytes; safe to call from worker threads."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, Rendered] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Rendered | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple, item: Rendered) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = item
            self._size += len(item.body)
            while self._size > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._size -= len(old.body)


def rendered(body: bytes, content_type: str) -> Rendered:
    return Rendered(body, content_type, hashlib.sha256(body).hexdigest())
