"""Crops of detected objects: the box plus a context margin, clipped to the photo.

Shared by everything that looks at one object of a photo: the filter's salvage of multi-product
review photos (``dataset/filter/salvage.py``: :func:`crop`, the clipped rectangle it stores) and
identify (``modeling/identify.py``: :func:`square_crop`, the square an embedder sees, also the
catalogue photo trimmed to its product).
Boxes are ``[x0, y0, x1, y1]`` in pixels of the upright photo (what the detector returns).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)
# Studio photos: a pixel is backdrop when its darkest channel is at least this bright, and a
# photo is on a backdrop when this share of its border pixels is.
BACKDROP_LEVEL = 240
BACKDROP_BORDER = 0.9
TRIM_MARGIN = 0.05


def crop_box(box: Sequence[float], width: int, height: int, margin: float = 0.1) -> tuple[int, int, int, int]:
    """The integer crop rectangle: ``box`` grown by ``margin`` of its width/height on each side,
    clipped to the ``width`` x ``height`` photo; at least one pixel each way."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0:
        x0, x1 = x1, x0
    if y1 < y0:
        y0, y1 = y1, y0
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    left = min(max(0, int(round(x0 - mx))), width - 1)
    top = min(max(0, int(round(y0 - my))), height - 1)
    right = max(left + 1, min(width, int(round(x1 + mx))))
    bottom = max(top + 1, min(height, int(round(y1 + my))))
    return left, top, right, bottom


def crop(image: Image.Image, box: Sequence[float], margin: float = 0.1) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The crop of ``image`` (an upright RGB photo) around ``box`` and the rectangle it covers."""
    rect = crop_box(box, image.width, image.height, margin)
    return image.crop(rect), rect


def square_box(box: Sequence[float], margin: float = 0.0) -> tuple[int, int, int]:
    """(left, top, side): ``box`` grown by ``margin`` of its width/height on each side, then
    squared around its centre; it may reach outside the photo. A square crop lets an embedder
    that fits its input to a square see the whole object instead of cutting a tall one."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = max(1.0, abs(x1 - x0)), max(1.0, abs(y1 - y0))
    side = max(w, h) * (1.0 + 2.0 * margin)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return int(round(cx - side / 2.0)), int(round(cy - side / 2.0)), max(1, int(round(side)))


def square_crop(image: Image.Image, box: Sequence[float], margin: float = 0.0,
                size: int | None = None, fill: tuple[int, int, int] = WHITE) -> Image.Image:
    """The :func:`square_box` of ``box`` with the photo's pixels, ``fill`` where it leaves the
    photo (white: catalogue photos are shot on white). With ``size`` it comes back ``size`` x
    ``size``, resampled once from the photo (no full-size intermediate crop)."""
    left, top, side = square_box(box, margin)
    out = size or side
    scale = out / side
    canvas = Image.new("RGB", (out, out), fill)
    src = (max(0, left), max(0, top), min(image.width, left + side), min(image.height, top + side))
    if src[2] <= src[0] or src[3] <= src[1]:
        return canvas
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    dst = (int(round((src[0] - left) * scale)), int(round((src[1] - top) * scale)))
    if size is None:
        canvas.paste(rgb.crop(src), dst)
        return canvas
    w = max(1, min(out - dst[0], int(round((src[2] - src[0]) * scale))))
    h = max(1, min(out - dst[1], int(round((src[3] - src[1]) * scale))))
    canvas.paste(rgb.resize((w, h), Image.Resampling.BILINEAR, box=src, reducing_gap=None), dst)
    return canvas


def trimmed_to_product(image: Image.Image) -> Image.Image:
    """A catalogue photo on a white backdrop cut to the product's extent (plus 5 %) and squared
    with white; any other photo unchanged."""
    rgb = np.asarray(image.convert("RGB"))
    dark = rgb.min(axis=2) < BACKDROP_LEVEL
    border = np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]])
    if border.mean() > 1.0 - BACKDROP_BORDER:
        return image
    ys, xs = np.nonzero(dark)
    if len(xs) < 50:
        return image
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return square_crop(image, box, TRIM_MARGIN)
