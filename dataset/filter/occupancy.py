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

from shoplens.photos import DECODER_VERSION

THUMB_SIDE = 128
BORDER_FRACTION = 0.04
# Colour distance (max over RGB channels, 0-255) beyond which a pixel differs from the background.
# JPEG noise and soft studio shadows stay below it; product edges exceed it.
COLOUR_TOLERANCE = 28
EXTENT_PERCENTILE = 1.0

# The statistics' own algorithm and the decoder that produced their pixels (rows are recomputed
# when the detector version, which carries the decoder version too, changes).
FEATURES_VERSION = f"stats-2+{DECODER_VERSION}"


def image_statistics(image: Image.Image | np.ndarray) -> dict:
    """Features stored per image: border_plain, fg_extent, fg_fill, luma_std (see module doc).
    ``image`` is a PIL image or an RGB uint8 array (the filter passes the model-sized array it
    already has, so no second decode or resize is needed)."""
    rgb = image if isinstance(image, np.ndarray) else np.asarray(image.convert("RGB"))
    # Every n-th pixel down to about THUMB_SIDE: the background median and the extent do not need
    # a filtered thumbnail, and striding costs nothing next to a resize.
    step = max(1, -(-max(rgb.shape[:2]) // THUMB_SIDE))
    # Planar (3, h, w) int16: per-channel operations on whole planes are an order of magnitude
    # faster than reductions over a trailing axis of 3.
    planes = rgb[::step, ::step].transpose(2, 0, 1).astype(np.int16, order="C")
    _, h, w = planes.shape
    ring = max(1, int(round(min(h, w) * BORDER_FRACTION)))
    border = np.concatenate([
        planes[:, :ring].reshape(3, -1), planes[:, -ring:].reshape(3, -1),
        planes[:, :, :ring].reshape(3, -1), planes[:, :, -ring:].reshape(3, -1)], axis=1)
    # The median of integers is a whole or half number: doubled, all distances stay exact int16.
    background_x2 = (2 * np.median(border, axis=1)).astype(np.int16)[:, None]
    tolerance_x2 = 2 * COLOUR_TOLERANCE
    border_distance = np.abs(2 * border - background_x2).max(axis=0)
    distance = np.abs(2 * planes - background_x2[:, :, None])
    foreground = np.maximum(np.maximum(distance[0], distance[1]), distance[2]) > tolerance_x2
    luma = 0.299 * planes[0] + 0.587 * planes[1] + 0.114 * planes[2]
    stats = {
        "border_plain": float((border_distance <= tolerance_x2).mean()),
        "fg_fill": float(foreground.mean()),
        "fg_extent": 0.0,
        "luma_std": float(luma.std()),
    }
    columns, rows = foreground.sum(axis=0), foreground.sum(axis=1)
    if columns.sum() >= 4:
        x1, x2 = _percentiles(columns, (EXTENT_PERCENTILE, 100 - EXTENT_PERCENTILE))
        y1, y2 = _percentiles(rows, (EXTENT_PERCENTILE, 100 - EXTENT_PERCENTILE))
        stats["fg_extent"] = float((x2 - x1 + 1) * (y2 - y1 + 1) / (w * h))
    return {k: round(v, 4) for k, v in stats.items()}


def _percentiles(counts: np.ndarray, qs: tuple[float, float]) -> list[float]:
    """``np.percentile`` (linear) of the coordinates of the foreground pixels, from the per-row or
    per-column pixel counts, without listing every pixel."""
    cumulative = np.cumsum(counts)
    n = int(cumulative[-1])
    out = []
    for q in qs:
        position = q / 100 * (n - 1)
        low = int(np.floor(position))
        # The k-th smallest coordinate (0-based) is the first index whose cumulative count > k.
        at_low, at_high = np.searchsorted(cumulative, [low + 1, min(low + 1, n - 1) + 1])
        out.append(float(at_low + (position - low) * (at_high - at_low)))
    return out
