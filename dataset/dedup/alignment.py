"""Geometric check of a candidate near-duplicate pair: does one photo's pixels re-frame the other's?

A crop or re-framing of a photo is the same pixels under an axis-aligned scale and shift; a
different photo of the same product (another shot, pose, light) is not, however close its
embedding. :func:`aligned_correlation` fits that scale and shift (Gauss-Newton on the intensity
difference, coarse to fine) between two small grayscale thumbnails of the border-trimmed photos
and returns the normalised cross-correlation of the overlap once aligned: about 1.0 for a crop,
JPEG re-encoding, resize or brightness change of one photo, far lower for two shots. The dedup
stage uses it on the embedding's candidate pairs (:mod:`dataset.dedup.similarity`); thresholds
are measured in ``benchmarks/near_duplicates.py``.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates, zoom

THUMBNAIL_SIZE = 64  # side of the stored grayscale thumbnail (4 KB a photo)
# (side, blur sigma, Gauss-Newton iterations) per level, coarse to fine: the coarse level's blur
# lets a 10 % shift converge from the identity.
LEVELS = ((16, 1.0, 12), (32, 0.8, 8), (64, 0.6, 6))
# Below this share of one thumbnail still covered by the other once aligned it is not a re-framing.
MIN_OVERLAP = 0.6
THUMBNAIL_SCHEME = f"gray{THUMBNAIL_SIZE}-stretched;align-gn-v1"


def thumbnail_of(trimmed: Image.Image) -> np.ndarray:
    """uint8 (THUMBNAIL_SIZE, THUMBNAIL_SIZE): the whole border-trimmed photo, grayscale, stretched
    to a square (a crop then differs from its original by a scale and shift per axis only)."""
    small = trimmed.convert("L").resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8)


def _interpolation(positions: np.ndarray, side: int) -> np.ndarray:
    """(P, n, side) linear-interpolation weights: row j of pair p samples a line at ``positions[p, j]``
    (clamped at the edge). The warp is a scale and shift per axis, so sampling an image is
    ``rows @ image @ columns.T``: two small matrix products instead of a gather per pixel."""
    count, n = positions.shape
    clamped = np.clip(positions, 0, side - 1)
    low = np.minimum(clamped.astype(np.int64), side - 2)
    fraction = clamped - low
    weights = np.zeros((count, n, side), np.float32)
    np.put_along_axis(weights, low[:, :, None], (1 - fraction)[:, :, None], axis=2)
    np.put_along_axis(weights, low[:, :, None] + 1, fraction[:, :, None], axis=2)
    return weights


def aligned_correlations(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per pair k, the better of :func:`_fitted_correlations` both ways round (``second[k]`` onto
    ``first[k]`` and back): the fit converges best with the crop as the reference (the original
    then covers all of it), and which of the two is the crop is not known."""
    first, second = np.asarray(first, np.float32), np.asarray(second, np.float32)
    both = _fitted_correlations(np.concatenate([first, second]), np.concatenate([second, first]))
    return np.maximum(both[:len(first)], both[len(first):])


def _fitted_correlations(references: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation (-1..1) of each ``others[k]`` warped onto ``references[k]`` by the
    best axis-aligned scale and shift (``other`` sampled at (sy * v + ty, sx * u + tx) for the
    reference's normalised coordinates u, v), all pairs fitted together; -1 for a pair where less
    than :data:`MIN_OVERLAP` of the reference stays covered."""
    references, others = np.asarray(references, np.float32), np.asarray(others, np.float32)
    count, full = references.shape[0], references.shape[1]
    if count == 0:
        return np.zeros(0)
    params = np.tile(np.array([1.0, 0.0, 1.0, 0.0], np.float32), (count, 1))  # sx, tx, sy, ty per pair
    failed = np.zeros(count, bool)
    correlation = np.full(count, -1.0)
    for side, sigma, iterations in LEVELS:
        if side > full:
            continue
        scale = (1, side / full, side / full)
        a = gaussian_filter(references if side == full else zoom(references, scale, order=1), (0, sigma, sigma))
        b = gaussian_filter(others if side == full else zoom(others, scale, order=1), (0, sigma, sigma))
        grad_y, grad_x = np.gradient(b, axis=(1, 2))
        line = np.arange(side, dtype=np.float32) / (side - 1)
        v, u = np.meshgrid(line, line, indexing="ij")
        uu, vv = u.reshape(1, -1), v.reshape(1, -1)
        target_all = a.reshape(count, -1)
        for step in range(iterations + 1):
            x = (params[:, 0, None] * line + params[:, 1, None]) * (side - 1)  # (P, side): per column
            y = (params[:, 2, None] * line + params[:, 3, None]) * (side - 1)  # per row
            inside = ((y >= 0) & (y <= side - 1))[:, :, None] & ((x >= 0) & (x <= side - 1))[:, None, :]
            inside = inside.reshape(count, -1)
            covered = inside.sum(1)
            failed |= covered < MIN_OVERLAP * side * side
            weight = (inside / np.maximum(covered, 1)[:, None]).astype(np.float32)

            def standardised(values):
                mean = (values * weight).sum(1, keepdims=True)
                spread = np.sqrt((((values - mean) ** 2) * weight).sum(1, keepdims=True)) + 1e-6
                return (values - mean) / spread, spread
            rows, columns = _interpolation(y, side), _interpolation(x, side).transpose(0, 2, 1)

            def sample(image):
                return (rows @ image @ columns).reshape(count, -1)
            target, _ = standardised(target_all)
            warped, spread = standardised(sample(b))
            correlation = (warped * target * weight).sum(1)
            if step == iterations:
                break
            gx = sample(grad_x) * np.float32(side - 1) / spread
            gy = sample(grad_y) * np.float32(side - 1) / spread
            jacobian = np.stack([gx * uu, gx, gy * vv, gy], axis=2) * inside[:, :, None]
            normal = np.matmul(jacobian.transpose(0, 2, 1), jacobian) + np.float32(1e-3) * np.eye(4, dtype=np.float32)
            residual = np.matmul(jacobian.transpose(0, 2, 1), (warped - target)[:, :, None])
            update = np.linalg.solve(normal, residual)[:, :, 0]
            params = np.where(failed[:, None], params, params - update).astype(np.float32)
    return np.where(failed, -1.0, correlation)


def aligned_correlation(reference: np.ndarray, other: np.ndarray) -> float:
    """:func:`aligned_correlations` of one pair."""
    return float(aligned_correlations(reference[None], other[None])[0])
