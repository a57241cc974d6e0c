"""The replica's own photo set: one distinctive synthetic object per product.

Each product is a fixed look (silhouette, two colours, surface pattern) that a small classifier
can learn; every photo of it varies pose, scale, position, background and lighting the way
customer photos do. Generated once per seed into a cache folder and reused (atomic rename, so
concurrent generators never see a half-written set).
"""
from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from shoplens.config import DEFAULT_CATEGORIES

from .listings import ProductSource

GENERATOR_VERSION = 1
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "ring", "cross", "diamond",
          "crescent", "heart")
PATTERNS = ("solid", "stripes", "dots", "checker", "rings")
PALETTE = [(220, 40, 40), (240, 140, 20), (235, 210, 30), (60, 170, 60), (30, 160, 170),
           (40, 80, 210), (130, 60, 200), (220, 70, 160), (120, 80, 40), (30, 30, 30),
           (245, 245, 240), (140, 140, 150)]


@dataclass(frozen=True)
class ProductLook:
    shape: str
    pattern: str
    colour: tuple[int, int, int]
    accent: tuple[int, int, int]


def default_cache_dir() -> Path:
    base = os.environ.get("SHOPLENS_REPLICA_CACHE") or os.environ.get("XDG_CACHE_HOME") \
        or str(Path.home() / ".cache")
    return Path(base) / "shoplens-replica"


def product_looks(seed: int, count: int) -> list[ProductLook]:
    """``count`` distinct looks; the first ones differ pairwise in two of shape, pattern, colour."""
    rng = random.Random(f"looks:{seed}")
    combos = [(s, p, c) for s in range(len(SHAPES)) for p in range(len(PATTERNS))
              for c in range(len(PALETTE))]
    rng.shuffle(combos)
    chosen: list[tuple[int, int, int]] = []
    for min_differences in (2, 1):  # two where the combinations allow, then at least one
        for combo in combos:
            if len(chosen) < count and all(
                    sum(a != b for a, b in zip(combo, other)) >= min_differences
                    for other in chosen):
                chosen.append(combo)
    if len(chosen) < count:
        raise ValueError(f"cannot make {count} distinct product looks")
    looks = []
    for s, p, c in chosen:
        accent = rng.choice([i for i in range(len(PALETTE)) if i != c])
        looks.append(ProductLook(SHAPES[s], PATTERNS[p], PALETTE[c], PALETTE[accent]))
    return looks


def _shape_mask(shape: str, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    m, s = size * 0.05, size * 0.95
    c = size / 2
    r = size * 0.45

    def polygon(n: int, radius: float, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
        return [(c + radius * math.cos(phase + 2 * math.pi * i / n),
                 c + radius * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "circle":
        d.ellipse([m, m, s, s], fill=255)
    elif shape == "square":
        d.rectangle([size * 0.12, size * 0.12, size * 0.88, size * 0.88], fill=255)
    elif shape == "triangle":
        d.polygon(polygon(3, r), fill=255)
    elif shape == "star":
        outer, inner = polygon(5, r), polygon(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        d.polygon([p for pair in zip(outer, inner) for p in pair], fill=255)
    elif shape == "hexagon":
        d.polygon(polygon(6, r, 0), fill=255)
    elif shape == "ring":
        d.ellipse([m, m, s, s], fill=255)
        d.ellipse([size * 0.32, size * 0.32, size * 0.68, size * 0.68], fill=0)
    elif shape == "cross":
        d.rectangle([size * 0.36, m, size * 0.64, s], fill=255)
        d.rectangle([m, size * 0.36, s, size * 0.64], fill=255)
    elif shape == "diamond":
        d.polygon([(c, m), (size * 0.8, c), (c, s), (size * 0.2, c)], fill=255)
    elif shape == "crescent":
        d.ellipse([m, m, s, s], fill=255)
        d.ellipse([size * 0.3, size * 0.0, size * 1.05, size * 0.8], fill=0)
    elif shape == "heart":
        d.ellipse([size * 0.08, size * 0.15, size * 0.54, size * 0.6], fill=255)
        d.ellipse([size * 0.46, size * 0.15, size * 0.92, size * 0.6], fill=255)
        d.polygon([(size * 0.1, size * 0.45), (size * 0.9, size * 0.45), (c, size * 0.93)], fill=255)
    return mask


def _pattern_fill(look: ProductLook, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base, accent = np.array(look.colour, np.float32), np.array(look.accent, np.float32)
    if look.pattern == "solid":
        t = np.zeros_like(xx)
        t[(yy > 0.45) & (yy < 0.55)] = 1.0  # one band so solid objects still have a feature
    elif look.pattern == "stripes":
        t = ((xx + yy) * 6 % 1.0 < 0.5).astype(np.float32)
    elif look.pattern == "dots":
        t = (((xx * 6 % 1.0) - 0.5) ** 2 + ((yy * 6 % 1.0) - 0.5) ** 2 < 0.07).astype(np.float32)
    elif look.pattern == "checker":
        t = (((xx * 5).astype(int) + (yy * 5).astype(int)) % 2).astype(np.float32)
    else:  # rings
        t = (np.hypot(xx - 0.5, yy - 0.5) * 10 % 1.0 < 0.5).astype(np.float32)
    shade = 1.0 - 0.35 * np.hypot(xx - 0.35, yy - 0.3)  # a soft highlight gives the object volume
    rgb = base[None, None] * (1 - t[..., None]) + accent[None, None] * t[..., None]
    return np.clip(rgb * shade[..., None], 0, 255).astype(np.uint8)


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """A two-colour gradient with low-frequency clutter (a table top, a floor), drawn small and
    scaled up: smooth, cheap, and not a free cue for the classifier."""
    small_w, small_h = max(width // 24, 4), max(height // 24, 4)
    c1 = np.array([rng.randrange(40, 240) for _ in range(3)], np.float32)
    c2 = np.array([rng.randrange(40, 240) for _ in range(3)], np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    nprng = np.random.default_rng(rng.randrange(2**32))
    clutter = nprng.normal(0, 25, (small_h, small_w, 3)).astype(np.float32)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None] + clutter
    return Image.fromarray(np.uint8(np.clip(img, 0, 255))).resize((width, height), Image.BICUBIC)


def render_photo(look: ProductLook, rng: random.Random) -> Image.Image:
    """One customer-like photo of a product: random framing, pose, background and light."""
    width, height = rng.randrange(320, 641), rng.randrange(320, 641)
    side = int(min(width, height) * rng.uniform(0.6, 0.95))
    texture_side = min(side, 240)  # drawn at most 240 px and scaled: same look, a quarter of the work
    obj = Image.fromarray(_pattern_fill(look, texture_side)).resize((side, side), Image.BILINEAR)
    mask = _shape_mask(look.shape, side)
    angle = rng.uniform(-180, 180)
    obj, mask = obj.rotate(angle, Image.BILINEAR, expand=True), mask.rotate(angle, Image.BILINEAR,
                                                                              expand=True)
    if obj.width > width or obj.height > height:  # a rotated square can outgrow the frame
        scale = min(width / obj.width, height / obj.height)
        size = (max(int(obj.width * scale), 1), max(int(obj.height * scale), 1))
        obj, mask = obj.resize(size, Image.BILINEAR), mask.resize(size, Image.BILINEAR)
    x = rng.randrange(0, width - obj.width + 1)
    y = rng.randrange(0, height - obj.height + 1)
    photo = _background(rng, width, height)
    shadow = mask.resize((max(mask.width // 8, 1), max(mask.height // 8, 1)), Image.BILINEAR) \
        .resize(mask.size, Image.BILINEAR)
    offset = int(side * 0.03)
    photo.paste((0, 0, 0), (x + offset, y + offset), shadow.point(lambda v: v * 0.4))
    photo.paste(obj, (x, y), mask)
    # Lighting: a directional brightness ramp and a colour cast (computed small, scaled up), plus
    # sensor noise.
    small_w, small_h = max(width // 16, 2), max(height // 16, 2)
    yy, xx = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    la = rng.uniform(0, 2 * math.pi)
    ramp = (xx * math.cos(la) + yy * math.sin(la)) / max(small_w, small_h)
    gain = rng.uniform(0.7, 1.15) + rng.uniform(0.0, 0.35) * (ramp - ramp.mean())
    cast = np.array([rng.uniform(0.9, 1.1) for _ in range(3)], np.float32)
    light = np.asarray(Image.fromarray(gain.astype(np.float32), "F").resize((width, height),
                                                                            Image.BILINEAR))
    nprng = np.random.default_rng(rng.randrange(2**32))
    noise_level = rng.randrange(1, 8)
    noise = nprng.integers(-noise_level, noise_level + 1, (height, width, 3), dtype=np.int16)
    arr = np.asarray(photo, np.float32) * (light[..., None] * cast) + noise
    photo = Image.fromarray(np.uint8(np.clip(arr, 0, 255)))
    if rng.random() < 0.3:
        photo = photo.filter(ImageFilter.BoxBlur(rng.choice((1, 1, 2))))
    return photo


def synthetic_sources(seed: int = 0, cache_dir: Path | None = None, products_per_category: int = 7,
                      photos_per_product: tuple[int, int] = (6, 25)) -> list[ProductSource]:
    """The generated set: per category ``products_per_category`` learnable products plus 1-2
    products with 0-2 photos; photos cached under ``cache_dir``."""
    lo, hi = photos_per_product
    if not (1 <= lo <= hi) or products_per_category < 1:
        raise ValueError("need products_per_category >= 1 and 1 <= min photos <= max photos")
    rng = random.Random(f"synthetic:{seed}")
    plan: list[tuple[str, str, int]] = []  # (category id, product key, photo count)
    for cat_id in DEFAULT_CATEGORIES:
        for index in range(products_per_category):
            plan.append((cat_id, f"{cat_id}-p{index}", rng.randint(lo, hi)))
        for index in range(rng.randint(1, 2)):
            plan.append((cat_id, f"{cat_id}-sparse{index}", rng.randint(0, 2)))
    # Learnable products take the most distinct looks; the sparse ones come last.
    order = sorted(range(len(plan)), key=lambda i: "sparse" in plan[i][1])
    distinct = product_looks(seed, len(plan))
    looks = [None] * len(plan)
    for look, index in zip(distinct, order):
        looks[index] = look
    folder_name = (f"v{GENERATOR_VERSION}-seed{seed}-n{products_per_category}-p{lo}-{hi}")
    root = Path(cache_dir or default_cache_dir()) / folder_name
    if not (root / "COMPLETE").exists():
        _generate(root, seed, plan, looks)
    sources = []
    for (cat_id, key, count), look in zip(plan, looks):
        photos = [root / key / f"{i:03d}.jpg" for i in range(count)]
        sources.append(ProductSource(DEFAULT_CATEGORIES[cat_id], cat_id, None, photos, key=key))
    return sources


def _generate(root: Path, seed: int, plan, looks) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        for (cat_id, key, count), look in zip(plan, looks):
            (staging / key).mkdir()
            for i in range(count):
                rng = random.Random(f"photo:{seed}:{key}:{i}")
                photo = render_photo(look, rng)
                photo.save(staging / key / f"{i:03d}.jpg", "JPEG", quality=rng.randrange(80, 96))
        (staging / "COMPLETE").write_text("ok\n")
        try:
            staging.rename(root)
        except OSError:  # another process finished first; its set is identical
            if not (root / "COMPLETE").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
