"""The one photo decoder (shoplens.photos) and the stages that must see a photo the way it shows it.

Every test image is made here: an asymmetric four-colour picture, written in each format phones
and shops produce, some of them stored sideways with an EXIF orientation as phones do.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dataset.dedup.hashing import hamming, hashes_of_bytes, hashes_of_image
from shoplens.vision.detector import fit_for_model, open_for_model, tensor_from_fitted
from dataset.filter.report import thumbnail_data_uri
from shoplens.photos import (THUMBNAIL_MAX_SIDE, PhotoLimits, PhotoRejected, decode_photo,
                             read_photo_file, thumbnail_jpeg)

ORIENTATION = 0x0112
RED, GREEN, BLUE, YELLOW = (220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)


def upright_picture(width: int = 96, height: int = 64) -> Image.Image:
    """Four flat quadrants, so any rotation or mirror shows (and lossy codecs barely blur it)."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(GREEN, (width // 2, 0, width, height // 2))
    image.paste(BLUE, (0, height // 2, width // 2, height))
    image.paste(YELLOW, (width // 2, height // 2, width, height))
    return image


def encoded(image: Image.Image, fmt: str, orientation: int | None = None, **options) -> bytes:
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def sideways(image: Image.Image) -> Image.Image:
    """How a phone held upright stores ``image`` with EXIF orientation 6 (view: rotate 90 cw)."""
    return image.transpose(Image.Transpose.ROTATE_90)


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries almost no pixel data (a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def mpo(first: Image.Image, second: Image.Image) -> bytes:
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[second], quality=95)
    return out.getvalue()


PICTURE = upright_picture()
# name -> (bytes, short format, largest mean difference a lossy codec may leave)
FORMATS = {
    "jpeg stored sideways, EXIF orientation 6": (
        lambda: encoded(sideways(PICTURE), "JPEG", orientation=6, quality=95), "jpeg", 4.0),
    "png with an opaque alpha channel": (lambda: encoded(PICTURE.convert("RGBA"), "PNG"), "png", 0.0),
    "palette png": (lambda: encoded(PICTURE.quantize(4), "PNG"), "png", 0.0),
    "webp": (lambda: encoded(PICTURE, "WEBP", lossless=True), "webp", 0.0),
    "mpo (a phone's multi-picture jpeg)": (
        lambda: mpo(PICTURE, Image.new("RGB", PICTURE.size, (0, 0, 0))), "jpeg", 4.0),
    "heic stored sideways, EXIF orientation 6": (
        lambda: encoded(sideways(PICTURE), "HEIF", orientation=6, quality=95), "heic", 6.0),
    "gif": (lambda: encoded(PICTURE.quantize(4), "GIF"), "gif", 0.0),
    "cmyk jpeg (print-prepared)": (lambda: encoded(PICTURE.convert("CMYK"), "JPEG", quality=95), "jpeg", 6.0),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_phone_format_decodes_to_the_same_upright_rgb_picture(name):
    make, short_format, tolerance = FORMATS[name]
    photo = decode_photo(make())
    assert photo.format == short_format
    assert photo.image.mode == "RGB" and photo.image.size == PICTURE.size
    assert (photo.width, photo.height) == PICTURE.size
    assert mean_difference(photo.image, PICTURE) <= tolerance


def test_the_sideways_test_photo_really_is_sideways_without_its_exif():
    """Guards the test above: the stored pixels differ from the upright picture."""
    raw = Image.open(io.BytesIO(FORMATS["jpeg stored sideways, EXIF orientation 6"][0]()))
    assert raw.size == PICTURE.size[::-1]


def test_an_mpo_decodes_to_its_first_frame_not_a_later_one():
    photo = decode_photo(mpo(Image.new("RGB", (64, 48), BLUE), Image.new("RGB", (64, 48), RED)))
    assert mean_difference(photo.image, Image.new("RGB", (64, 48), BLUE)) < 4


def test_transparent_pixels_are_composited_on_white():
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # fully transparent black
    image.paste((200, 0, 0, 255), (0, 0, 16, 32))
    pixels = np.asarray(decode_photo(encoded(image, "PNG")).image)
    assert pixels[:, :16].tolist() == np.full((32, 16, 3), (200, 0, 0)).tolist()
    assert pixels[:, 16:].tolist() == np.full((32, 16, 3), 255).tolist()


def test_a_palette_png_with_a_transparent_index_is_composited_on_white():
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))
    pixels = np.asarray(decode_photo(encoded(image, "PNG", transparency=0)).image)
    assert pixels[0, 0].tolist() == [10, 200, 10] and pixels[0, 15].tolist() == [255, 255, 255]


def test_sixteen_bit_grayscale_keeps_its_top_eight_bits():
    samples = np.array([[0, 0x1234, 0x8000, 0xFFFF]], dtype=np.uint16)
    image = Image.fromarray(samples)  # mode I;16
    pixels = np.asarray(decode_photo(encoded(image, "PNG")).image)
    assert pixels[0, :, 0].tolist() == [0x00, 0x12, 0x80, 0xFF]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_a_reduced_decode_still_reports_the_full_upright_size_and_covers_the_fit():
    big = upright_picture(1600, 1200)
    photo = decode_photo(encoded(sideways(big), "JPEG", orientation=6), reduce_to=200)
    assert (photo.width, photo.height) == (1600, 1200)
    assert photo.image.width < 1600 and photo.image.width >= 200 and photo.image.height >= 150
    assert photo.image.width / photo.image.height == pytest.approx(1600 / 1200, rel=0.01)


# --- refusals, each with its reason ---------------------------------------------------------
@pytest.mark.parametrize("make_body, reason", [
    (lambda: b"", "empty_image"),
    (lambda: b"<html><body>not found</body></html>", "not_image"),
    (lambda: encoded(upright_picture(400, 300), "JPEG")[:700], "truncated_image"),
    (lambda: encoded(upright_picture(400, 300), "PNG")[:-200], "truncated_image"),
    (lambda: encoded(PICTURE, "PPM"), "unsupported_format"),
    # Declares 30000 x 30000 with almost no data: refused from the header, never inflated (a
    # decode attempt would say truncated_image instead).
    (lambda: png_header_only(30000, 30000), "image_too_large"),
])
def test_bad_bytes_are_refused_with_a_reason_code_and_a_message(make_body, reason):
    with pytest.raises(PhotoRejected) as err:
        decode_photo(make_body())
    assert err.value.reason == reason
    assert err.value.message and err.value.detail in err.value.message


def test_pillows_own_bomb_check_still_refuses_when_the_configured_cap_is_higher():
    with pytest.raises(PhotoRejected) as err:
        decode_photo(png_header_only(30000, 30000), PhotoLimits(max_pixels=10**10))
    assert err.value.reason == "image_too_large"


def test_the_pixel_cap_counts_pixels_and_the_byte_cap_counts_bytes():
    body = encoded(upright_picture(100, 100), "PNG")
    assert decode_photo(body, PhotoLimits(max_pixels=100 * 100, max_bytes=len(body))).width == 100
    for limits in (PhotoLimits(max_pixels=100 * 100 - 1), PhotoLimits(max_bytes=len(body) - 1)):
        with pytest.raises(PhotoRejected) as err:
            decode_photo(body, limits)
        assert err.value.reason == "image_too_large"


def test_an_oversized_file_is_refused_from_its_size(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encoded(PICTURE, "PNG"))
    assert read_photo_file(path) == path.read_bytes()
    with pytest.raises(PhotoRejected) as err:
        read_photo_file(path, PhotoLimits(max_bytes=10))
    assert err.value.reason == "image_too_large"


def test_a_format_outside_the_callers_list_is_refused_before_decoding():
    with pytest.raises(PhotoRejected) as err:
        decode_photo(encoded(PICTURE, "BMP"), formats={"jpeg", "png"})
    assert err.value.reason == "unsupported_format"
    assert decode_photo(encoded(PICTURE, "BMP")).format == "bmp"


# --- the one thumbnailer ----------------------------------------------------------------------
def test_thumbnails_are_upright_jpegs_within_the_side_and_the_side_cap():
    body = encoded(sideways(upright_picture(1200, 800)), "JPEG", orientation=6)
    small = Image.open(io.BytesIO(thumbnail_jpeg(body, 120)))
    assert small.format == "JPEG" and small.size == (120, 80)
    huge = Image.open(io.BytesIO(thumbnail_jpeg(body, 100_000)))
    assert huge.size == (THUMBNAIL_MAX_SIDE, THUMBNAIL_MAX_SIDE * 2 // 3)
    assert mean_difference(small, upright_picture(120, 80)) < 8


def test_the_thumbnailer_applies_the_pixel_cap():
    with pytest.raises(PhotoRejected) as err:
        thumbnail_jpeg(encoded(upright_picture(400, 300), "JPEG"), 64, PhotoLimits(max_pixels=1000))
    assert err.value.reason == "image_too_large"


def test_the_filter_report_shows_capped_images_and_bombs_without_a_thumbnail():
    assert thumbnail_data_uri(encoded(PICTURE, "PNG")).startswith("data:image/jpeg;base64,")
    assert thumbnail_data_uri(png_header_only(30000, 30000)) is None
    assert thumbnail_data_uri(encoded(PICTURE, "PNG"), PhotoLimits(max_pixels=100)) is None


# --- the stages see a phone photo as it shows ---------------------------------------------------
def twins(fmt: str = "PNG", size=(320, 240)) -> tuple[bytes, bytes]:
    """The same photo stored sideways with EXIF orientation 6, and physically upright."""
    picture = upright_picture(*size)
    picture.paste((250, 250, 250), (20, 20, 60, 200))  # something off-centre, for the hashes
    return encoded(sideways(picture), fmt, orientation=6), encoded(picture, fmt)


def test_dedup_hashes_a_rotated_exif_photo_like_its_physically_rotated_twin():
    rotated, upright = twins()
    assert hashes_of_bytes(rotated) == hashes_of_bytes(upright)
    # What dedup did before the core decoder: the stored, sideways pixels hash differently.
    stored = hashes_of_image(Image.open(io.BytesIO(rotated)))
    assert stored != hashes_of_bytes(upright)


def test_dedup_hashes_of_lossy_jpeg_twins_are_near_duplicates():
    rotated, upright = twins("JPEG")
    a, b = hashes_of_bytes(rotated), hashes_of_bytes(upright)
    assert hamming(a.phash, b.phash) + hamming(a.dhash, b.dhash) <= 4


@pytest.mark.parametrize("size", [(320, 240), (1200, 900)])  # the second is draft-decoded
def test_the_detector_input_of_a_rotated_exif_photo_is_that_of_its_upright_twin(size):
    rotated, upright = twins("PNG", size)
    inputs = []
    for body in (rotated, upright):
        image, original = open_for_model(body)
        fitted, scale = fit_for_model(image, original)
        inputs.append((original, scale, tensor_from_fitted(fitted)))
    (size_a, scale_a, tensor_a), (size_b, scale_b, tensor_b) = inputs
    assert size_a == size_b == size and scale_a == scale_b
    assert np.array_equal(tensor_a, tensor_b)


def test_the_detector_input_of_a_draft_decoded_jpeg_is_upright():
    rotated, upright = twins("JPEG", (1200, 900))
    (image_a, size_a), (image_b, size_b) = open_for_model(rotated), open_for_model(upright)
    assert size_a == size_b == (1200, 900) and image_a.size == image_b.size
    assert mean_difference(image_a, image_b) < 4


# --- consumers: the crawler stores what phones send, predict reads HEIC ------------------------
def test_the_crawler_stores_an_mpo_as_jpeg_and_a_heic_as_heic_with_upright_sizes():
    from crawler.images import IMAGE_CONTENT_TYPES, validate_image

    limits = {"max_pixels": 10**7, "max_bytes": 10**7}
    phone = validate_image(mpo(PICTURE, PICTURE), "image/jpeg", **limits)
    assert (phone.format, phone.width, phone.height) == ("jpeg", 96, 64)
    heic = validate_image(encoded(sideways(PICTURE), "HEIF", orientation=6), "image/heic", **limits)
    assert (heic.format, heic.width, heic.height) == ("heic", 96, 64)
    assert IMAGE_CONTENT_TYPES[heic.format] == "image/heic"


class _OneProductEnsemble:
    """Stands in for a trained ensemble: predict's reading path is what is under test."""

    def __init__(self):
        self.seen: list[Image.Image] = []

    def predict_probs_decoded(self, decoded):
        self.seen.extend(decoded)
        return [np.array([1.0])] * len(decoded)

    def top_k(self, probs):
        return [{"name": "the product", "prob": float(probs[0])}]


def test_predict_accepts_an_iphone_heic_photo(tmp_path):
    from shoplens.vision import images
    from modeling.predict import predict_paths

    (tmp_path / "IMG_0001.HEIC").write_bytes(encoded(sideways(PICTURE), "HEIF", orientation=6, quality=95))
    (tmp_path / "notes.txt").write_text("not a photo")
    files = images.expand_paths([str(tmp_path)])
    assert files == [str(tmp_path / "IMG_0001.HEIC")]
    ensemble = _OneProductEnsemble()
    answers = list(predict_paths(ensemble, files))
    assert answers == [{"image": files[0], "top": [{"name": "the product", "prob": 1.0}]}]
    assert ensemble.seen[0].size == PICTURE.size and mean_difference(ensemble.seen[0], PICTURE) < 6
    assert images.model_input(read_photo_file(files[0]), 32).shape == (32, 32, 3)


def test_predict_names_the_file_and_says_why_it_is_unreadable(tmp_path):
    from modeling.predict import predict_paths

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(encoded(upright_picture(400, 300), "JPEG")[:700])
    [answer] = predict_paths(_OneProductEnsemble(), [str(cut)])
    assert answer["error"].startswith(f"{cut}: image file is cut off")


def test_stored_hashes_and_filter_features_name_the_decoder_so_a_new_decoder_recomputes_them():
    """Dedup re-hashes rows of another HASH_VERSION and the filter re-inspects images without
    detections of the current detector version: both carry the decoder's version."""
    from dataset.dedup.hashing import HASH_VERSION
    from shoplens.vision.detector import Detector
    from dataset.filter.occupancy import FEATURES_VERSION
    from shoplens.photos import DECODER_VERSION
    from tests.conftest import shared_path

    assert DECODER_VERSION in HASH_VERSION and DECODER_VERSION in FEATURES_VERSION
    assert Detector(shared_path("models", "yolox_nano.onnx")).version.endswith(f"+{DECODER_VERSION}")
