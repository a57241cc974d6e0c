"""Room-like views of a catalogue product: cut from its white backdrop, pasted on a room photo.

What a product looks like when a detector finds it in a room, made from its studio photo: the
identify head trains on such views (``modeling/identify_head.py``) and identify's gallery can
be embedded through them (``identify_gallery_backgrounds``, ``modeling/identify.py``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from shoplens.vision import images
from shoplens.vision.crops import BACKDROP_BORDER, BACKDROP_LEVEL, TRIM_MARGIN, square_crop

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
BACKGROUND_SIDE = 640           # backgrounds are kept decoded at most this long a side
PRODUCT_SHARE = (0.25, 0.85)    # the pasted product's long side / the patch's short side
PATCH_SHARE = (0.4, 1.0)        # the background patch's sides / the background's
OCCLUDED = 0.6                  # the chance a view has one or two things in front of the product
OCCLUDER_SIDE = (0.2, 0.6)      # an occluder's sides / the product box's (covers <= 36 % each)
JITTER = (0.7, 1.3)             # brightness, contrast, saturation factors
LIGHT_TINT = (0.9, 1.1)         # per-channel gain: warm or cool room light
ROOM_PATCH_SHARE = (0.15, 0.5)  # a gallery view's room patch side / the background's short side


def background_photos(source: Path) -> list[Path]:
    """The background photos ``source`` names: every photo under a folder, or a text file's
    paths (one a line). Only these are ever read: a benchmark that holds rooms out passes a
    list without them (``benchmarks/identify_ikea.py --write-tune-rooms``)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    return [Path(line.strip()) for line in source.read_text().splitlines() if line.strip()]


def load_backgrounds(paths: list[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        img = images.decode(images.read_file(str(p)), str(p))
        img.thumbnail((BACKGROUND_SIDE, BACKGROUND_SIDE))
        out.append(img)
    return out


def product_cutout(image: Image.Image) -> tuple[Image.Image, Image.Image] | None:
    """The product of a catalogue photo on a white backdrop, cut to its extent, and its alpha:
    the non-white pixels with enclosed white (a white seat inside its frame) filled in and one
    pixel grown; None for a photo not on white or with almost no product pixels."""
    from scipy.ndimage import binary_fill_holes

    rgb = np.asarray(image.convert("RGB"))
    dark = rgb.min(axis=2) < BACKDROP_LEVEL
    border = np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]])
    if border.mean() > 1.0 - BACKDROP_BORDER or dark.sum() < 50:
        return None
    ys, xs = np.nonzero(dark)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    mask = binary_fill_holes(dark[y0:y1, x0:x1])
    alpha = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))
    return Image.fromarray(rgb[y0:y1, x0:x1]), alpha


def _scaled(cut: tuple[Image.Image, Image.Image], long_side: float):
    product, alpha = cut
    k = long_side / max(product.size)
    size = (max(1, round(product.width * k)), max(1, round(product.height * k)))
    return product.resize(size, Image.Resampling.BILINEAR), alpha.resize(size, Image.Resampling.BILINEAR)


def room_like_view(cut: tuple[Image.Image, Image.Image], backgrounds: list[Image.Image],
                   rng: np.random.Generator, size: int,
                   occluders: list[tuple[Image.Image, Image.Image]] = (),
                   occluded: float = OCCLUDED) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One room-like view of a product (``cut`` from :func:`product_cutout`): a random patch of a
    background photo, the product pasted on it at a random scale and place (mirrored half the
    time), with chance ``occluded`` one or two things in front of it (a rectangle of another
    background or flat colour, or another product from ``occluders``), brightness / contrast /
    saturation and light-colour jitter; then the square around the pasted product, margin 0,
    ``size`` px, as identify crops a detected box (``square_crop``). Returns the view and the
    pasted product's box in the patch's pixels."""
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    pw = max(16, round(bg.width * rng.uniform(*PATCH_SHARE)))
    ph = max(16, round(bg.height * rng.uniform(*PATCH_SHARE)))
    px, py = int(rng.integers(0, bg.width - pw + 1)), int(rng.integers(0, bg.height - ph + 1))
    canvas = bg.crop((px, py, px + pw, py + ph)).convert("RGB")
    product, alpha = _scaled(cut, min(pw, ph) * rng.uniform(*PRODUCT_SHARE))
    if rng.random() < 0.5:
        product = product.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        alpha = alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x0 = int(rng.integers(0, pw - product.width + 1))
    y0 = int(rng.integers(0, ph - product.height + 1))
    canvas.paste(product, (x0, y0), alpha)
    box = (x0, y0, x0 + product.width, y0 + product.height)
    if rng.random() < occluded:
        for _ in range(int(rng.integers(1, 3))):
            ow = max(1, round(product.width * rng.uniform(*OCCLUDER_SIDE)))
            oh = max(1, round(product.height * rng.uniform(*OCCLUDER_SIDE)))
            # anchored on the product box's edge or inside it, as a thing in front of it is
            ox = int(rng.integers(x0 - ow // 2, box[2] - ow // 2 + 1))
            oy = int(rng.integers(y0 - oh // 2, box[3] - oh // 2 + 1))
            kind = rng.random()
            if occluders and kind < 0.4:
                other, other_alpha = _scaled(occluders[int(rng.integers(len(occluders)))],
                                             max(ow, oh))
                canvas.paste(other, (ox, oy), other_alpha)
            elif kind < 0.7:
                src = backgrounds[int(rng.integers(len(backgrounds)))]
                sx = int(rng.integers(0, max(1, src.width - ow) + 1))
                sy = int(rng.integers(0, max(1, src.height - oh) + 1))
                canvas.paste(src.crop((sx, sy, sx + ow, sy + oh)).convert("RGB"), (ox, oy))
            else:
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                canvas.paste(Image.new("RGB", (ow, oh), colour), (ox, oy))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        canvas = enhance(canvas).enhance(rng.uniform(*JITTER))
    tint = rng.uniform(*LIGHT_TINT, size=3)
    canvas = Image.fromarray(np.clip(np.asarray(canvas, np.float32) * tint, 0, 255)
                             .astype(np.uint8))
    return square_crop(canvas, box, 0.0, size=size), box


def product_on_room_patch(cut: tuple[Image.Image, Image.Image], backgrounds: list[Image.Image],
                          rng: np.random.Generator, size: int) -> Image.Image:
    """The trimmed catalogue square of a product (``cut`` from :func:`product_cutout`, its
    extent plus ``TRIM_MARGIN`` each side, centred) with a random square patch of a background
    photo behind it instead of white, ``size`` px: the gallery's guess at how a detected crop
    of the product in a room looks. No jitter, mirror or occluders (unlike
    :func:`room_like_view`): on IKEA those cost the gallery tune-half recall."""
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    side = max(1, round(min(bg.size) * rng.uniform(*ROOM_PATCH_SHARE)))
    x, y = int(rng.integers(0, bg.width - side + 1)), int(rng.integers(0, bg.height - side + 1))
    canvas = bg.crop((x, y, x + side, y + side)).convert("RGB").resize(
        (size, size), Image.Resampling.BILINEAR)
    product, alpha = _scaled(cut, size / (1.0 + 2.0 * TRIM_MARGIN))
    canvas.paste(product, ((size - product.width) // 2, (size - product.height) // 2), alpha)
    return canvas
