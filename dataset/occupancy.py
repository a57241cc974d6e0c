"""Cheap per-image statistics the rules need besides detections: a foreground-extent estimate and
blankness, computed once per image on a subsampled (about 128 px) copy and stored with the detections.

Foreground extent: the background colour is the median of a thin ring along the photo's border;
pixels far from it are foreground, and the extent is the bounding box of the foreground (robust
percentiles, so stray specks do not stretch it) as a fraction of the frame. It is only trusted
when the border ring is itself plain (``border_plain`` near 1): on a studio or table-top photo the
border is background; in a cluttered scene it is not, and the rules fall back to the detector.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

THUMB_SIDE = 128
BORDER_FRACTION = 0.04
# Colour distance (max over RGB channels, 0-255) beyond which a pixel differs from the background.
# JPEG noise and soft studio shadows stay below it; product edges exceed it.
COLOUR_TOLERANCE = 28
EXTENT_PERCENTILE = 1.0

FEATURES_VERSION = "stats-2"


def image_statistics(image: Image.Image | np.ndarray) -> dict:
    """Features stored per image: border_plain, fg_extent, fg_fill, luma_std (see module doc).
    ``image`` is a PIL image or an RGB uint8 array."""
    rgb = image if isinstance(image, np.ndarray) else np.asarray(image.convert("RGB"))
    # Every n-th pixel down to about THUMB_SIDE: the background median and the extent do not need
    # a filtered thumbnail, and striding costs nothing next to a resize.
    step = max(1, -(-max(rgb.shape[:2]) // THUMB_SIDE))
    pixels = rgb[::step, ::step].astype(np.int16)
    h, w, _ = pixels.shape
    ring = max(1, int(round(min(h, w) * BORDER_FRACTION)))
    border = np.concatenate([
        pixels[:ring].reshape(-1, 3), pixels[-ring:].reshape(-1, 3),
        pixels[:, :ring].reshape(-1, 3), pixels[:, -ring:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    border_distance = np.abs(border - background).max(axis=1)
    distance = np.abs(pixels - background).max(axis=2)
    foreground = distance > COLOUR_TOLERANCE
    luma = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    stats = {
        "border_plain": float((border_distance <= COLOUR_TOLERANCE).mean()),
        "fg_fill": float(foreground.mean()),
        "fg_extent": 0.0,
        "luma_std": float(luma.std()),
    }
    ys, xs = np.nonzero(foreground)
    if len(xs) >= 4:
        x1, x2 = np.percentile(xs, [EXTENT_PERCENTILE, 100 - EXTENT_PERCENTILE])
        y1, y2 = np.percentile(ys, [EXTENT_PERCENTILE, 100 - EXTENT_PERCENTILE])
        stats["fg_extent"] = float((x2 - x1 + 1) * (y2 - y1 + 1) / (w * h))
    return {k: round(v, 4) for k, v in stats.items()}
