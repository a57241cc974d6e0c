"""Perceptual hashes (pHash and dHash, 64 bits each) of one image, as signed 64-bit integers.

PostgreSQL has no unsigned 64-bit type, so a hash is kept as the BIGINT with the same bits (two's
complement); Hamming distances are identical either way. A uniform border (a frame, letterbox
bars, the margin of a screenshot) is trimmed before hashing because it moves every pixel of the
small thumbnail the hashes are computed from; ``benchmarks/near_duplicates.py`` measures the gain.
Bytes are decoded by the core decoder (:mod:`shoplens.photos`), so a phone photo is hashed upright,
as the filter and the model see it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import imagehash
import numpy as np
import scipy.fftpack
from PIL import Image, ImageChops

from shoplens.photos import DECODER_VERSION, DEFAULT_LIMITS, PhotoLimits, PhotoRejected, decode_photo

HASH_BITS = 64
# Bumped whenever the bits a given image hashes to could change (library, size, preprocessing);
# rows with another version are re-hashed by the dedup stage.
HASH_VERSION = f"phash8+dhash8;trim-border-v1;{DECODER_VERSION};imagehash-{imagehash.__version__}"

# A border pixel may differ from the corner colour by this much (0-255, per channel) after JPEG
# re-encoding and still count as border.
BORDER_TOLERANCE = 24
# Trimming that would keep less than this fraction of a side is not a border but the photo's own
# flat background; the image is then hashed untrimmed.
MIN_KEPT_FRACTION = 0.5


# The core decoder's refusal, under the name the dedup stage catches.
ImageDecodeError = PhotoRejected


@dataclass(frozen=True)
class PerceptualHashes:
    phash: int  # signed 64-bit
    dhash: int  # signed 64-bit


def to_signed64(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


def to_unsigned64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")  # no copy of an RGB image


def trim_uniform_border(image: Image.Image, tolerance: int = BORDER_TOLERANCE) -> Image.Image:
    """The image without a frame whose colour matches its top-left corner pixel (within tolerance);
    the image itself (not a copy) when it is RGB and has no such frame."""
    rgb = _rgb(image)
    background = Image.new("RGB", rgb.size, rgb.getpixel((0, 0)))
    difference = ImageChops.difference(rgb, background).convert("L")
    mask = difference.point(_threshold_table(tolerance))
    box = mask.getbbox()
    if box is None:  # one flat colour: nothing to trim
        return rgb
    left, top, right, bottom = box
    if (right - left) < MIN_KEPT_FRACTION * rgb.width or (bottom - top) < MIN_KEPT_FRACTION * rgb.height:
        return rgb
    return rgb.crop(box)


@functools.lru_cache(maxsize=4)
def _threshold_table(tolerance: int) -> list[int]:
    return [255 if v > tolerance else 0 for v in range(256)]


def _bits_to_int(bits: np.ndarray) -> int:
    """The signed 64-bit value of a boolean array read row by row, first bit most significant
    (what ``int(str(imagehash.ImageHash(bits)), 16)`` gives, without the hex string)."""
    return to_signed64(int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big"))


def hashes_of_image(image: Image.Image, trim_border: bool = True) -> PerceptualHashes:
    """pHash and dHash with 8x8 bits, bit for bit ``imagehash.phash`` / ``imagehash.dhash`` (the
    same Pillow and scipy calls, tests/test_dedup_stage.py checks), sharing one grayscale image."""
    prepared = trim_uniform_border(image) if trim_border else _rgb(image)
    gray = prepared.convert("L")
    # imagehash.phash: 32x32 Lanczos, 2-D DCT-II, the 8x8 low frequencies against their median.
    pixels = np.asarray(gray.resize((8 * 4, 8 * 4), Image.LANCZOS))
    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8]
    phash = _bits_to_int(dct > np.median(dct))
    # imagehash.dhash: 9x8 Lanczos, each pixel brighter than its left neighbour.
    small = np.asarray(gray.resize((8 + 1, 8), Image.LANCZOS))
    dhash = _bits_to_int(small[:, 1:] > small[:, :-1])
    return PerceptualHashes(phash=phash, dhash=dhash)


def hashes_of_bytes(data: bytes, trim_border: bool = True,
                    limits: PhotoLimits = DEFAULT_LIMITS) -> PerceptualHashes:
    """Hashes of the upright photo in ``data``; :class:`ImageDecodeError` when it is not one."""
    return hashes_of_image(decode_photo(data, limits).image, trim_border=trim_border)


def hamming(a: int, b: int) -> int:
    return (to_unsigned64(a) ^ to_unsigned64(b)).bit_count()


def as_uint64(values) -> np.ndarray:
    """Signed (BIGINT) or unsigned hash values as a uint64 array with the same bits."""
    array = np.asarray(values)
    if array.dtype == np.uint64:
        return array
    if array.dtype == object:
        return np.array([to_unsigned64(int(v)) for v in array], dtype=np.uint64)
    return array.astype(np.int64).view(np.uint64)
