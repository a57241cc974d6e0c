"""Crops of detected objects: the box plus a context margin, clipped to the photo.

Shared by everything that looks at one object of a photo: the filter's salvage of multi-product
review photos (``dataset/filter/salvage.py``) and identify (detect, then search each object).
Boxes are ``[x0, y0, x1, y1]`` in pixels of the upright photo (what the detector returns).
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image


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
