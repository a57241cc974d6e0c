"""Every product in a photo (issue 17): detect, crop, embed, search each object in a gallery.

The command line's exact output, the category restriction, the whole-image fallback and the
gallery cache run on small drawn photos with a stub detector (its boxes are the test's input) and
a random-initialised backbone at 32 px; one test runs the real YOLOX-Nano on an IKEA room."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import count_keras_builds, shared_path
from drawn_products import drawn_photo
from modeling import identify as identify_module
from modeling.identify import Gallery, IdentifyError, read_listing
from modeling.identify_cli import main as identify_main
from shoplens.config import Settings
from shoplens.vision import images
from shoplens.vision.crops import square_crop
from shoplens.vision.detector import Box

PHOTO_SIZE = (160, 120)
CHAIR_BOX = (20.0, 30.0, 84.0, 94.0)  # where the room photo's chair is drawn


class StubDetector:
    """Returns the boxes it was given, whatever the photo."""

    def __init__(self, boxes: list[Box]):
        self.boxes = boxes
        self.calls = 0

    def detect(self, image, original_size=None):
        self.calls += 1
        return list(self.boxes)


def _settings(tmp_path, **overrides) -> Settings:
    return Settings().with_overrides(model_init="random", identify_image_size=32,
                                     identify_cache_dir=str(tmp_path / "cache"),
                                     search_cache_dir=str(tmp_path / "search-cache"), **overrides)


def _room_photo() -> Image.Image:
    """A grey room with the drawn product 1 (a red ellipse) pasted where CHAIR_BOX is."""
    room = Image.new("RGB", PHOTO_SIZE, (128, 128, 128))
    ImageDraw.Draw(room).rectangle((100, 10, 150, 110), fill=(40, 90, 40))
    x0, y0, x1, y1 = (int(v) for v in CHAIR_BOX)
    room.paste(drawn_photo(1, 0).resize((x1 - x0, y1 - y0)), (x0, y0))
    return room


@pytest.fixture
def gallery_dir(tmp_path):
    """12 chairs (ids 100.000.NN), a classless product and 3 couches; the couch 900.000.01 is
    the room's own chair crop, so unrestricted it is the nearest product of all."""
    folder = tmp_path / "gallery"
    folder.mkdir()
    rows = []
    room = _room_photo()
    for n in range(12):
        name = f"chair{n}.png"
        drawn_photo(1 + n % 4, 10 + n).save(folder / name)
        rows.append([name, f"100.000.{n:02d}", "chair"])
    drawn_photo(2, 50).save(folder / "any.png")
    rows.append(["any.png", "500.000.00", ""])
    square_crop(room, CHAIR_BOX, 0.1).save(folder / "couch1.png")
    rows.append(["couch1.png", "900.000.01", "couch"])
    for n in (2, 3):
        drawn_photo(n, 60 + n).save(folder / f"couch{n}.png")
        rows.append([f"couch{n}.png", f"900.000.0{n}", "couch"])
    listing = folder / "listing.csv"
    with listing.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "product_id", "class"])
        w.writerows(rows)
    room.save(tmp_path / "room.png")
    return listing, tmp_path / "room.png"


def _run(argv, settings, detector) -> tuple[int, list[dict], str]:
    out, err = io.StringIO(), io.StringIO()
    code = identify_main(argv, out=out, err=err, settings=settings, detector=detector)
    return code, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


# --- the command line's answer ------------------------------------------------------------------
def test_cli_answers_one_json_line_per_photo_with_each_object_its_box_class_score_and_ten_products(
        gallery_dir, tmp_path):
    listing, room = gallery_dir
    detector = StubDetector([Box("chair", 0.83, *CHAIR_BOX)])
    code, lines, _ = _run(["--gallery", str(listing), "--json", str(room)],
                          _settings(tmp_path), detector)
    assert code == 0 and len(lines) == 1
    line = lines[0]
    assert set(line) == {"image", "objects"} and line["image"] == str(room)
    [obj] = line["objects"]
    assert set(obj) == {"box", "class", "score", "top"}
    assert obj["box"] == list(CHAIR_BOX)  # image pixels, as the detector gave them
    assert all(isinstance(v, float) for v in obj["box"])
    assert obj["class"] == "chair" and obj["score"] == pytest.approx(0.83)
    assert len(obj["top"]) == 10
    assert all(set(t) == {"product_id", "score"} for t in obj["top"])
    listed = {r["product_id"] for r in read_listing(listing)}
    assert all(isinstance(t["product_id"], str) and t["product_id"] in listed for t in obj["top"])
    scores = [t["score"] for t in obj["top"]]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)


def test_a_detected_chair_is_only_matched_to_chairs_and_classless_products(gallery_dir, tmp_path):
    """The gallery's couch 900.000.01 is a copy of the chair's own crop; restricted to chairs it
    never appears, while the unrestricted whole-image search of the same crop finds it first."""
    listing, room = gallery_dir
    settings = _settings(tmp_path, identify_top=16)
    _, [line], _ = _run(["--gallery", str(listing), str(room)], settings,
                        StubDetector([Box("chair", 0.9, *CHAIR_BOX)]))
    returned = {t["product_id"] for t in line["objects"][0]["top"]}
    assert returned == {f"100.000.{n:02d}" for n in range(12)} | {"500.000.00"}

    crop = tmp_path / "crop.png"
    square_crop(_room_photo(), CHAIR_BOX, 0.1).save(crop)
    _, [line], _ = _run(["--gallery", str(listing), str(crop)], settings, StubDetector([]))
    assert line["objects"][0]["top"][0]["product_id"] == "900.000.01"


def test_nothing_detected_gives_one_whole_image_object_searched_over_every_product(
        gallery_dir, tmp_path):
    listing, room = gallery_dir
    # A person is detected, but it is not a configured home-goods class: as if nothing was.
    detector = StubDetector([Box("person", 0.95, 0, 0, 50, 50), Box("chair", 0.1, *CHAIR_BOX)])
    code, [line], _ = _run(["--gallery", str(listing), "--top", "16", str(room)],
                           _settings(tmp_path, identify_min_score=0.25), detector)
    assert code == 0
    [obj] = line["objects"]
    assert obj["box"] == [0.0, 0.0, float(PHOTO_SIZE[0]), float(PHOTO_SIZE[1])]
    assert obj["class"] is None and obj["score"] is None
    assert {t["product_id"] for t in obj["top"]} == {r["product_id"] for r in read_listing(listing)}


def test_several_objects_are_answered_best_detection_first_each_within_its_class(
        gallery_dir, tmp_path):
    listing, room = gallery_dir
    detector = StubDetector([Box("couch", 0.4, 90, 5, 155, 115), Box("chair", 0.7, *CHAIR_BOX)])
    _, [line], _ = _run(["--gallery", str(listing), str(room)], _settings(tmp_path), detector)
    assert [o["class"] for o in line["objects"]] == ["chair", "couch"]
    couch = line["objects"][1]
    # Three couches and the classless product: fewer than 10 products can be a couch.
    assert {t["product_id"] for t in couch["top"]} == {"900.000.01", "900.000.02", "900.000.03",
                                                       "500.000.00"}


def test_boxes_kept_are_the_best_of_each_class_within_the_caps():
    """Six chairs around a table: the per-class cap leaves room for the table."""
    from modeling.identify import detect_objects

    chairs = [Box("chair", 0.9 - i / 100, 10 * i, 0, 10 * i + 9, 20) for i in range(6)]
    boxes = [*chairs, Box("dining table", 0.5, 0, 30, 60, 60), Box("person", 0.99, 0, 0, 60, 60),
             Box("vase", 0.2, 0, 0, 10, 10), Box("couch", 0.6, 0, 0, 4, 40)]
    settings = Settings().with_overrides(identify_min_score=0.25, identify_max_objects=4,
                                         identify_max_per_class=0)
    kept = detect_objects(Image.new("RGB", (60, 60)), StubDetector(boxes), settings)
    # No person (not home goods), no vase (under the score), no 4 px couch (too thin to embed).
    assert [(d.label, d.score) for d in kept] == [("chair", 0.9), ("chair", 0.89),
                                                  ("chair", 0.88), ("chair", 0.87)]
    capped = detect_objects(Image.new("RGB", (60, 60)), StubDetector(boxes),
                            settings.with_overrides(identify_max_per_class=2))
    assert [d.label for d in capped] == ["chair", "chair", "dining table"]


def test_a_product_listed_under_two_classes_is_found_for_either(gallery_dir, tmp_path):
    """A sofa bed photographed for both departments: one product, matched as a couch and a bed."""
    listing, room = gallery_dir
    listing.write_text(listing.read_text() + "chair0.png,800.000.01,couch\n"
                                              "chair1.png,800.000.01,bed\n")
    gallery = Gallery.from_listing(listing, _settings(tmp_path))
    sofa_bed = next(pid for pid, ref in gallery.refs.items() if ref == "800.000.01")
    assert sofa_bed in gallery.allowed("couch") and sofa_bed in gallery.allowed("bed")
    assert sofa_bed not in gallery.allowed("chair")


def test_a_square_crop_keeps_context_and_squares_with_white_outside_the_photo():
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    crop = square_crop(img, (0.0, 10.0, 40.0, 30.0), margin=0.25)
    assert crop.size == (60, 60)  # the 40 px side plus 25 % on each side
    assert crop.getpixel((0, 30)) == (255, 255, 255)  # left of the photo: white
    assert crop.getpixel((30, 30)) == (10, 20, 30)


def test_a_square_crop_scaled_in_one_step_matches_the_full_size_crop_scaled():
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    ImageDraw.Draw(img).rectangle((10, 15, 30, 35), fill=(200, 40, 40))
    full = square_crop(img, (0.0, 10.0, 40.0, 30.0), margin=0.25)
    small = square_crop(img, (0.0, 10.0, 40.0, 30.0), margin=0.25, size=30)
    assert small.size == (30, 30)
    assert small.getpixel((2, 15)) == (255, 255, 255)  # the white outside the photo, scaled
    expected = np.asarray(full.resize((30, 30), Image.Resampling.BILINEAR), dtype=np.int16)
    assert np.abs(np.asarray(small, dtype=np.int16) - expected).mean() < 8


def _classless_rows_dropped(listing):
    """The same gallery without its classless product: every product has a class."""
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(line for line in lines if "500.000.00" not in line) + "\n")
    return listing


def test_boxes_of_a_class_the_gallery_has_no_product_of_take_no_place_under_the_caps(
        gallery_dir, tmp_path):
    """A vase outscores the couch, but no gallery product is a vase: with one object allowed,
    the couch is the one identified (a classless product would match a vase: then it stays)."""
    listing, room = gallery_dir
    detector = StubDetector([Box("vase", 0.9, 0, 0, 40, 40), Box("couch", 0.4, 90, 5, 155, 115)])
    settings = _settings(tmp_path, identify_max_objects=1)
    _, [line], _ = _run(["--gallery", str(listing), str(room)], settings, detector)
    assert [o["class"] for o in line["objects"]] == ["vase"]
    _, [line], _ = _run(["--gallery", str(_classless_rows_dropped(listing)), str(room)],
                        settings, detector)
    assert [o["class"] for o in line["objects"]] == ["couch"]


def test_a_fallback_class_with_no_box_is_the_whole_photo_searched_within_that_class(
        gallery_dir, tmp_path):
    listing, room = gallery_dir
    detector = StubDetector([Box("chair", 0.7, *CHAIR_BOX)])
    settings = _settings(tmp_path, identify_fallback_classes=("couch", "chair", "bed"))
    _, [line], _ = _run(["--gallery", str(_classless_rows_dropped(listing)), str(room)],
                        settings, detector)
    # The chair has its box; the couch has none (the whole photo stands in); no product is a
    # bed, so no bed object.
    assert [(o["class"], o["score"]) for o in line["objects"]] == [("chair", 0.7), ("couch", None)]
    couch = line["objects"][1]
    assert couch["box"] == [0.0, 0.0, float(PHOTO_SIZE[0]), float(PHOTO_SIZE[1])]
    assert set(couch) == {"box", "class", "score", "top"}
    assert {t["product_id"] for t in couch["top"]} == {"900.000.01", "900.000.02", "900.000.03"}


def test_the_fallback_embedding_searches_its_own_index_of_the_gallery(gallery_dir, tmp_path):
    """identify_fallback_embedding (a trained head): the whole-photo objects are answered from
    the gallery embedded by it, the boxes from the gallery's own embedding."""
    from modeling.embedding import HeadTraining
    from modeling.identify_head import train

    listing, room = gallery_dir
    folder = tmp_path / "objects"
    folder.mkdir()
    for n in range(6):
        drawn_photo(1 + n % 4, 80 + n).save(folder / f"300.000.0{n}.png")
    trained = train(sorted(folder.iterdir()), _settings(tmp_path), views=0,
                    cfg=HeadTraining(epochs=2, dim=8))
    trained.save(tmp_path / "head")
    settings = _settings(tmp_path, identify_fallback_classes=("couch",),
                         identify_fallback_embedding=str(tmp_path / "head"))
    gallery = Gallery.from_listing(listing, settings)
    assert gallery.fallback.embedder.dim == 8 and gallery.embedder.dim != 8
    objects = identify_module.identify(Image.open(room).convert("RGB"), gallery,
                                       StubDetector([Box("chair", 0.7, *CHAIR_BOX)]), settings)
    assert [o["class"] for o in objects] == ["chair", "couch"]
    expected = gallery.fallback.search(
        gallery.fallback.embedder.embed_decoded([Image.open(room).convert("RGB")])[0], "couch", 10)
    assert [t["product_id"] for t in objects[1]["top"]] == [pid for pid, _ in expected]


def test_the_exact_class_search_ranks_as_the_index_search(gallery_dir, tmp_path, monkeypatch):
    listing, room = gallery_dir
    gallery = Gallery.from_listing(listing, _settings(tmp_path))
    vector = gallery.embedder.embed_decoded([Image.open(room).convert("RGB")])[0]
    exact = {label: gallery.search(vector, label, 10) for label in ("chair", "couch", None)}
    monkeypatch.setattr(identify_module, "EXACT_SEARCH_LIMIT", 0)
    for label, hits in exact.items():
        via_index = gallery.search(vector, label, 10)
        assert [p for p, _ in hits] == [p for p, _ in via_index]
        np.testing.assert_allclose([s for _, s in hits], [s for _, s in via_index], atol=1e-5)


def test_crops_embedded_at_a_smaller_size_share_the_gallery_embedding(gallery_dir, tmp_path):
    listing, room = gallery_dir
    settings = _settings(tmp_path).with_overrides(identify_image_size=64, identify_crop_size=32)
    gallery = Gallery.from_listing(listing, settings)
    small = gallery.crop_embedder(32)
    assert small.image_size == 32 and gallery.embedder.image_size == 64
    assert small.backbone == gallery.embedder.backbone and small.dim == gallery.embedder.dim
    _, [line], _ = _run(["--gallery", str(listing), str(room)], settings,
                        StubDetector([Box("chair", 0.7, *CHAIR_BOX)]))
    assert line["objects"][0]["class"] == "chair" and len(line["objects"][0]["top"]) == 10


# --- the gallery --------------------------------------------------------------------------------
def test_an_indexed_gallery_is_reused_and_a_changed_listing_is_indexed_again(
        gallery_dir, tmp_path, monkeypatch):
    listing, room = gallery_dir
    settings = _settings(tmp_path)
    first = Gallery.from_listing(listing, settings)
    assert len(list((tmp_path / "cache").glob("gallery-*"))) == 1

    def no_embedding(*args, **kwargs):
        raise AssertionError("a cached gallery was embedded again")

    monkeypatch.setattr(identify_module, "_add_batch", no_embedding)
    again = Gallery.from_listing(listing, settings)
    assert again.index.root == first.index.root and len(again.index) == len(first.index)
    assert again.refs == first.refs and again.classes == first.classes

    monkeypatch.undo()
    listing.write_text(listing.read_text().replace("100.000.00,chair", "100.000.00,dining table"))
    changed = Gallery.from_listing(listing, settings)
    assert changed.index.root != first.index.root
    assert len(list((tmp_path / "cache").glob("gallery-*"))) == 2


def test_a_cached_gallery_embeds_crops_on_the_frozen_network_and_builds_no_keras(
        gallery_dir, tmp_path, monkeypatch):
    """The gallery is embedded on the frozen network made once beside the galleries; a later
    command that finds the gallery cached answers a photo without building Keras (seconds per
    command otherwise) and gets the vectors the Keras network would give, within float noise."""
    from shoplens.vision.embedding import NETWORK_CACHE, NETWORK_SUFFIX

    listing, room = gallery_dir
    settings = _settings(tmp_path)
    Gallery.from_listing(listing, settings)
    assert len(list((tmp_path / "cache" / NETWORK_CACHE).glob(f"*{NETWORK_SUFFIX}"))) == 1

    built = count_keras_builds(monkeypatch)
    again = Gallery.from_listing(listing, settings)
    photo = drawn_photo(1, 0)
    frozen = again.index.embedder.embed_decoded([photo])
    assert built == []
    monkeypatch.undo()
    keras = identify_module.identify_embedder(settings).embed_decoded([photo])
    np.testing.assert_allclose(frozen, keras, atol=1e-5)


@pytest.mark.parametrize("content, message", [
    ("file,id\nchair0.png,1\n", "must name the columns path,product_id,class"),
    ("path,product_id,class\nchair0.png,1,armchair\n", "'armchair' is not a COCO class"),
    ("path,product_id,class\nmissing.png,1,chair\n", "photo missing.png not found"),
    ("path,product_id,class\n", "no gallery photos listed"),
])
def test_a_bad_listing_exits_2_saying_what_is_wrong_and_where(gallery_dir, tmp_path, content,
                                                              message):
    listing, room = gallery_dir
    bad = listing.with_name("bad.csv")
    bad.write_text(content)
    code, lines, err = _run(["--gallery", str(bad), str(room)], _settings(tmp_path),
                            StubDetector([]))
    assert code == 2 and lines == []
    assert err.startswith("error: ") and message in err and str(bad) in err


def test_json_mode_lasts_for_the_one_command(gallery_dir, tmp_path):
    """--json switches progress bars off for this command only: a later command in the same
    process (a test, the Airflow worker) prints its human form again."""
    from shoplens import cli

    listing, room = gallery_dir
    bad = listing.with_name("empty.csv")
    bad.write_text("path,product_id,class\n")
    assert not cli.json_mode()
    code, _, _ = _run(["--json", "--gallery", str(bad), str(room)], _settings(tmp_path),
                      StubDetector([]))
    assert code == 2 and not cli.json_mode()


def test_an_unreadable_photo_gets_an_error_line_and_the_others_are_answered(gallery_dir, tmp_path):
    listing, room = gallery_dir
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    code, lines, err = _run(["--gallery", str(listing), str(broken), str(room)],
                            _settings(tmp_path), StubDetector([]))
    assert code == 2
    assert lines[0]["image"] == str(broken) and "error" in lines[0]
    assert lines[1]["image"] == str(room) and len(lines[1]["objects"]) == 1
    assert "1 of 2 photo(s) could not be read" in err


def test_unknown_detector_classes_in_the_settings_are_refused(gallery_dir, tmp_path):
    listing, room = gallery_dir
    code, _, err = _run(["--gallery", str(listing), str(room)],
                        _settings(tmp_path, identify_classes=("chair", "armchair")), StubDetector([]))
    assert code == 2 and "armchair" in err


def test_without_a_gallery_it_asks_the_manifest_for_the_current_index_and_says_when_it_is_down(
        gallery_dir, tmp_path):
    listing, room = gallery_dir
    down = _settings(tmp_path, manifest_url="postgresql+psycopg2://nobody@127.0.0.1:9/x")
    code, lines, err = _run([str(room)], down, StubDetector([]))
    assert code == 3 and lines == [] and "manifest is unreachable" in err


def test_a_shop_index_restricts_by_the_class_its_categories_map_to(tmp_path):
    """``--index DIR``: products carry the shop's category; the configured map says which
    detector class each category is, an unmapped category matches any object."""
    from modeling.search_index import SearchIndex
    from shoplens.vision.embedding import Embedder

    settings = _settings(tmp_path, identify_category_classes={"10": "chair", "20": "couch"})
    index = SearchIndex(Embedder("efficientnet_lite0", 32, settings=settings))
    categories = {1: "10", 2: "10", 3: "20", 4: "30"}
    index.add_products([{"product_id": p, "name": f"p{p}", "category": c}
                        for p, c in categories.items()])
    index.add_photos([(drawn_photo(p, 0), p, f"p{p}") for p in categories])
    index.save(tmp_path / "index")
    room = tmp_path / "room.png"
    _room_photo().save(room)
    code, [line], _ = _run(["--index", str(tmp_path / "index"), str(room)], settings,
                           StubDetector([Box("chair", 0.9, *CHAIR_BOX)]))
    assert code == 0
    assert {t["product_id"] for t in line["objects"][0]["top"]} == {1, 2, 4}


def test_by_default_the_shops_bed_and_table_categories_are_found_as_their_detector_classes(
        tmp_path):
    """Without configuration, the shop's categories that have a COCO class are restricted to it
    (beds and mattresses: bed, tables: dining table, bowls: bowl); hangers and chests of drawers
    have none and match an object of any class. An empty map switches the restriction off."""
    from modeling.search_index import SearchIndex
    from shoplens.vision.embedding import Embedder

    categories = {1: "10120000", 2: "10130000", 3: "10150000", 4: "13020000", 5: "16220000"}

    def answer(settings, label):
        index = SearchIndex(Embedder("efficientnet_lite0", 32, settings=settings))
        index.add_products([{"product_id": p, "name": f"p{p}", "category": c}
                            for p, c in categories.items()])
        index.add_photos([(drawn_photo(1 + (p - 1) % 4, p), p, f"p{p}") for p in categories])
        index.save(tmp_path / "index")
        room = tmp_path / "room.png"
        _room_photo().save(room)
        code, [line], _ = _run(["--index", str(tmp_path / "index"), str(room)], settings,
                               StubDetector([Box(label, 0.9, *CHAIR_BOX)]))
        assert code == 0
        return {t["product_id"] for t in line["objects"][0]["top"]}

    assert answer(_settings(tmp_path), "bed") == {1, 2, 4}
    assert answer(_settings(tmp_path), "dining table") == {3, 4}
    assert answer(_settings(tmp_path, identify_category_classes={}), "bed") == {1, 2, 3, 4, 5}


# --- the real detector --------------------------------------------------------------------------
def test_the_real_detector_finds_chairs_in_an_ikea_room_and_they_get_only_chairs(
        tmp_path, monkeypatch, capsys):
    """``shoplens identify`` end to end with YOLOX-Nano on an IKEA dining room."""
    model = shared_path("models", "yolox_nano.onnx")
    ikea = shared_path("datasets", "ikea", "images")
    room = ikea / "room_scenes" / ROOM_WITH_CHAIRS
    if not room.is_file():
        pytest.skip(f"needs ../shared/datasets/ikea/images/room_scenes/{ROOM_WITH_CHAIRS}")
    listing = tmp_path / "gallery.csv"
    chairs = sorted((ikea / "chair").glob("*.jpg"))[:12]
    couches = sorted((ikea / "couch").glob("*.jpg"))[:4]
    with listing.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "product_id", "class"])
        w.writerows([[str(p), p.stem, "chair"] for p in chairs])
        w.writerows([[str(p), p.stem, "couch"] for p in couches])
    for name, value in {"MODEL_INIT": "random", "IDENTIFY_IMAGE_SIZE": "32",
                        "DETECTOR_MODEL_PATH": str(model),
                        "IDENTIFY_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(f"SHOPLENS_{name}", value)
    from shoplens.cli import main as shoplens_main

    assert shoplens_main(["identify", "--gallery", str(listing), "--json", str(room)]) == 0
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    width, height = Image.open(room).size
    found = [o for o in line["objects"] if o["class"] == "chair"]
    assert found, line
    chair_ids = {p.stem for p in chairs}
    for o in found:
        x0, y0, x1, y1 = o["box"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert o["score"] >= Settings().identify_min_score
        assert len(o["top"]) == 10 and {t["product_id"] for t in o["top"]} <= chair_ids


ROOM_WITH_CHAIRS = "ikea-dine-wherever-you-want__1364308412079-s4.jpg"


# --- the benchmark's protocol -------------------------------------------------------------------
def test_benchmark_ranks_a_class_by_the_best_object_and_counts_a_hit_if_any_true_product_is_in_the_top_k():
    """The IKEA paper's protocol (benchmarks/identify_ikea.py): per (room, class), that class's
    products ranked by their best score over the room's objects of the class; no object = miss."""

    from benchmark_modules import load_benchmark

    bench = load_benchmark("identify_ikea")
    gallery = [{"product_id": p, "class": c} for p, c in
               [("a", "chair"), ("b", "chair"), ("c", "chair"), ("t", "dining table")]]
    gvec = np.eye(4, dtype=np.float32)
    rooms = [{"name": "r1", "split": "tune", "truth": {"chair": {"b"}, "dining table": {"t"}}},
             {"name": "r2", "split": "report", "truth": {"chair": {"c"}}}]
    # r1: two chair objects, one like "a", one mostly like "b" -> "b" is ranked first by its
    # best object; r2: its chair looks like "a", then "c"; r1's table was not detected.
    objects = {("r1", "chair"): np.array([[0.9, 0.1, 0, 0], [0.1, 0.95, 0, 0]]),
               ("r2", "chair"): np.array([[0.9, 0.1, 0.5, 0]]),
               ("r1", "dining table"): np.zeros((0, 4))}

    def queries(room, cls):
        q = objects[(room["name"], cls)]
        return q, np.zeros(len(q))

    table = bench.recall_table(rooms, gallery, gvec, queries)
    assert table["all"]["chair"] == {"pairs": 2, "R@1": 0.5, "R@3": 1.0, "R@10": 1.0}
    assert table["tune"]["chair"]["R@1"] == 1.0 and table["report"]["chair"]["R@1"] == 0.0
    assert table["all"]["dining table"] == {"pairs": 1, "R@1": 0.0, "R@3": 0.0, "R@10": 0.0}
    assert bench.parse_cap("8p2") == (8, 2) and bench.parse_cap("8") == (8, 0)


def test_benchmark_hubness_demotes_a_product_close_to_its_whole_class():
    """``--hubness``: each product's score less BETA x its mean similarity to its K nearest
    stand-in queries of its class (its class-mates' photos, or given crops of that class)."""
    from benchmark_modules import load_benchmark

    bench = load_benchmark("identify_ikea")
    gallery = [{"product_id": p, "class": "chair"} for p in "abcd"]
    # "h" (product b) sits between the others: the hub.
    gvec = bench.unit(np.array([[1.0, 0, 0], [0.6, 0.6, 0.5], [0, 1.0, 0], [0, 0, 1.0]]))
    hub = bench.class_hubness(gvec, gallery, k=3)
    assert hub.argmax() == 1
    np.testing.assert_allclose(hub[0], np.mean([gvec[0] @ gvec[j] for j in (1, 2, 3)]))
    proxies = {"chair": bench.unit(np.array([[0.0, 1.0, 0.1]]))}
    np.testing.assert_allclose(bench.class_hubness(gvec, gallery, 1, proxies),
                               gvec @ proxies["chair"][0])
    assert not bench.class_hubness(gvec, gallery, 1, {"couch": proxies["chair"]}).any()
    rooms = [{"name": "r1", "split": "report", "truth": {"chair": {"a"}}}]
    query = bench.unit(np.array([[0.8, 0.45, 0.35]]))  # leans to "a", closer still to the hub

    def queries(room, cls):
        return query, np.zeros(1)

    plain = bench.recall_table(rooms, gallery, gvec, queries)
    fixed = bench.recall_table(rooms, gallery, gvec, queries, gbias=-1.0 * hub)
    assert (plain["all"]["chair"]["R@1"], fixed["all"]["chair"]["R@1"]) == (0.0, 1.0)
    assert bench.parse_hubness("0") is None
    assert bench.parse_hubness("rooms:10:0.5") == ("rooms", 10, 0.5)


def test_roi_pooling_of_a_box_over_a_square_photo_is_the_backbones_own_pooled_features(tmp_path):
    """identify_pooling "roi": one pass over the photo, each box averaged over the feature-map
    cells under it; a box over the whole (square) photo is the global average pooling."""

    from shoplens.vision.embedding import Embedder

    settings = _settings(tmp_path)
    photo = _room_photo().resize((64, 64))
    embedder = Embedder("efficientnet_lite0", 64, settings=settings)
    [whole, left] = identify_module.roi_features(embedder, photo, [(0, 0, 64, 64), (0, 0, 31, 64)],
                                                 64)
    expected = embedder.features(np.asarray(photo, dtype=np.float32)[None])[0]
    # (random-initialised features are tiny: compared as directions and relative sizes)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    np.testing.assert_allclose(unit(whole), unit(expected), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(whole), np.linalg.norm(expected), rtol=1e-3)
    assert float(unit(left) @ unit(whole)) < 0.9999  # the left half pools only its own cells


def test_roi_pooling_answers_each_object_within_its_class_without_cropping(gallery_dir, tmp_path,
                                                                           monkeypatch):
    listing, room = gallery_dir
    settings = _settings(tmp_path, identify_pooling="roi", identify_roi_size=64)

    def no_crops(*args, **kwargs):
        raise AssertionError("roi pooling embeds no crops")

    monkeypatch.setattr(identify_module, "square_crop", no_crops)
    detector = StubDetector([Box("couch", 0.4, 90, 5, 155, 115), Box("chair", 0.7, *CHAIR_BOX)])
    _, [line], _ = _run(["--gallery", str(listing), str(room)], settings, detector)
    assert [o["class"] for o in line["objects"]] == ["chair", "couch"]
    chairs = {f"100.000.{n:02d}" for n in range(12)} | {"500.000.00"}
    assert {t["product_id"] for t in line["objects"][0]["top"]} <= chairs
    assert {t["product_id"] for t in line["objects"][1]["top"]} == {
        "900.000.01", "900.000.02", "900.000.03", "500.000.00"}


@pytest.mark.parametrize("overrides", [{"identify_pooling": "grid"}, {"identify_roi_size": 8}])
def test_bad_roi_settings_are_refused(overrides):
    from shoplens.config import ConfigError

    with pytest.raises(ConfigError):
        Settings().with_overrides(**overrides)


def test_a_head_trained_on_other_products_embeds_the_gallery_and_the_crops(gallery_dir, tmp_path):
    """modeling.identify_head: the gallery's products are left out of training; the saved
    embedding, named by identify_embedding, indexes the gallery (its own dimension) and answers."""
    from modeling.embedding import HeadTraining
    from modeling.identify_head import train, training_photos

    listing, room = gallery_dir
    folder = tmp_path / "objects"
    folder.mkdir()
    for n in range(6):
        drawn_photo(1 + n % 4, 80 + n).save(folder / f"300.000.0{n}.png")
    drawn_photo(1, 10).save(folder / "100.000.00.png")  # a gallery product: never trained on
    photos = training_photos(folder, {r["product_id"] for r in read_listing(listing)})
    assert [p.stem for p in photos] == [f"300.000.0{n}" for n in range(6)]

    trained = train(photos, _settings(tmp_path), views=1, cfg=HeadTraining(epochs=2, dim=8))
    trained.save(tmp_path / "head")
    settings = _settings(tmp_path, identify_embedding=str(tmp_path / "head"))
    gallery = Gallery.from_listing(listing, settings)
    assert gallery.embedder.trained and gallery.embedder.dim == 8
    assert Gallery.from_listing(listing, _settings(tmp_path)).embedder.dim != 8  # cached apart
    detector = StubDetector([Box("chair", 0.7, *CHAIR_BOX)])
    _, [line], _ = _run(["--gallery", str(listing), str(room)], settings, detector)
    assert line["objects"][0]["class"] == "chair" and len(line["objects"][0]["top"]) == 10


def test_a_missing_identify_embedding_is_a_clear_error(gallery_dir, tmp_path):
    listing, _ = gallery_dir
    with pytest.raises(IdentifyError, match="identify_embedding"):
        Gallery.from_listing(listing, _settings(tmp_path, identify_embedding=str(tmp_path / "no")))


# --- the head's room-like training views -------------------------------------------------------
def _studio_photo(colour=(220, 20, 20), size=(60, 30)) -> Image.Image:
    """A catalogue-style photo: a ``size`` product of one colour on a white backdrop."""
    photo = Image.new("RGB", (100, 100), (255, 255, 255))
    ImageDraw.Draw(photo).rectangle((20, 35, 20 + size[0] - 1, 35 + size[1] - 1), fill=colour)
    return photo


def _blue_rooms(n=3) -> list:
    return [Image.new("RGB", (200 + 40 * i, 150), (30, 40, 200 + 10 * i)) for i in range(n)]


def test_a_room_like_view_is_the_same_for_the_same_seed_and_differs_for_another():
    from shoplens.vision.room_views import product_cutout, room_like_view

    cut = product_cutout(_studio_photo())
    others = [product_cutout(_studio_photo((20, 200, 20), (30, 30)))]

    def view(seed):
        img, box = room_like_view(cut, _blue_rooms(), np.random.default_rng(seed), 48, others, 1.0)
        return np.asarray(img), box

    (a, box_a), (b, box_b), (c, _) = view(3), view(3), view(4)
    assert a.shape == (48, 48, 3) and box_a == box_b
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("seed", range(6))
def test_the_pasted_product_fills_the_square_crop_of_its_box(seed):
    """Margin 0, as identify crops a detected box: the product (wider than tall) spans the whole
    width of the view, half its height, centred, on the room's background."""
    from shoplens.vision.room_views import product_cutout, room_like_view

    cut = product_cutout(_studio_photo())
    assert cut[0].size == (60, 30) and np.asarray(cut[1]).min() == 255
    rng = np.random.default_rng(seed)
    rooms = _blue_rooms()
    view, (x0, y0, x1, y1) = room_like_view(cut, rooms, rng, 64, occluded=0.0)
    assert abs((x1 - x0) - 2 * (y1 - y0)) <= 1 and 0 <= x0 < x1 <= max(r.width for r in rooms)
    pixels = np.asarray(view).astype(int)
    red = pixels[..., 0] > pixels[..., 2] + 40
    cols, rows = np.nonzero(red.any(axis=0))[0], np.nonzero(red.any(axis=1))[0]
    assert cols.min() <= 1 and cols.max() >= 62                     # the product's full width
    assert abs(len(rows) - 32) <= 3 and abs(rows.min() - 16) <= 3    # half the height, centred


def test_a_photo_not_on_a_white_backdrop_has_no_cutout():
    from shoplens.vision.room_views import product_cutout

    assert product_cutout(Image.new("RGB", (64, 64), (90, 120, 60))) is None
    assert product_cutout(Image.new("RGB", (64, 64), (255, 255, 255))) is None


# --- the gallery seen in rooms (identify_gallery_backgrounds) -----------------------------------
def test_a_product_on_a_room_patch_is_the_trimmed_square_with_the_room_behind_it_not_white():
    from shoplens.vision.room_views import product_on_room_patch, product_cutout

    view = product_on_room_patch(product_cutout(_studio_photo()), _blue_rooms(),
                                 np.random.default_rng(0), 66)
    pixels = np.asarray(view).astype(int)
    red = pixels[..., 0] > pixels[..., 2] + 40
    cols, rows = np.nonzero(red.any(axis=0))[0], np.nonzero(red.any(axis=1))[0]
    # 60 x 30 product + 5 % of its long side each way = a 66 px square: 60 x 30 px, centred
    assert abs(len(cols) - 60) <= 2 and abs(cols.min() - 3) <= 1
    assert abs(len(rows) - 30) <= 2 and abs(rows.min() - 18) <= 1
    corners = pixels[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners[:, 2] >= 200).all() and (corners[:, 0] <= 40).all()  # the blue room


def _studio_listing(tmp_path) -> Path:
    """Three studio photos on white and one photo with no backdrop (nothing to cut out)."""
    folder = tmp_path / "studio"
    folder.mkdir()
    rows = []
    for n, colour in enumerate([(200, 30, 30), (30, 160, 30), (30, 30, 200)]):
        _studio_photo(colour, (50 - 8 * n, 30 + 5 * n)).save(folder / f"p{n}.png")
        rows.append(f"p{n}.png,100.000.0{n},chair")
    Image.new("RGB", (80, 80), (120, 90, 60)).save(folder / "plain.png")
    rows.append("plain.png,200.000.00,chair")
    listing = folder / "listing.csv"
    listing.write_text("path,product_id,class\n" + "\n".join(rows) + "\n")
    return listing


def _rooms_folder(tmp_path) -> Path:
    rooms = tmp_path / "rooms"
    rooms.mkdir()
    for n, room in enumerate(_blue_rooms()):
        room.save(rooms / f"room{n}.png")
    return rooms


def test_room_views_make_a_studio_photos_vector_its_own_weighted_plus_its_views_mean(tmp_path):
    from shoplens.vision.crops import trimmed_to_product
    from shoplens.vision.room_views import product_on_room_patch, product_cutout

    embedder = identify_module.identify_embedder(_settings(tmp_path))
    photos = [_studio_photo(), Image.new("RGB", (80, 80), (120, 90, 60))]
    clean = identify_module.embed_images(embedder, [trimmed_to_product(p) for p in photos])
    rooms = _blue_rooms()
    means = identify_module.room_view_means(embedder, photos, [7, 8], rooms, 3)
    got = identify_module.with_room_views(clean, means, 2.0)

    rng = np.random.default_rng(7)
    side = images.margin_size(32)  # the square the embedder fits a photo into
    views = [product_on_room_patch(product_cutout(photos[0]), rooms, rng, side) for _ in range(3)]
    expected = 2.0 * clean[0] + embedder.embed_decoded(views).mean(axis=0)
    np.testing.assert_allclose(got[0], expected / np.linalg.norm(expected), atol=1e-5)
    assert np.abs(got[0] - clean[0]).max() > 1e-3
    assert np.isnan(means[1]).all()                  # no backdrop, nothing to paste:
    np.testing.assert_array_equal(got[1], clean[1])  # its vector is unchanged
    again = identify_module.room_view_means(embedder, photos, [7, 8], rooms, 3)
    np.testing.assert_array_equal(again, means)


def test_a_gallery_seen_in_rooms_is_indexed_apart_and_again_when_a_room_photo_changes(tmp_path):
    listing, rooms = _studio_listing(tmp_path), _rooms_folder(tmp_path)
    plain = Gallery.from_listing(listing, _settings(tmp_path))
    settings = _settings(tmp_path, identify_gallery_backgrounds=str(rooms),
                         identify_gallery_room_views=2)
    in_rooms = Gallery.from_listing(listing, settings)
    assert in_rooms.index.root != plain.index.root
    vec = {pid: plain.index._vectors[plain.index._product_ids == pid][0] for pid in (1, 4)}
    moved = {pid: in_rooms.index._vectors[in_rooms.index._product_ids == pid][0] for pid in (1, 4)}
    assert np.abs(moved[1] - vec[1]).max() > 1e-3           # a studio photo: seen in rooms
    np.testing.assert_allclose(moved[4], vec[4], atol=1e-6)  # no backdrop: as it was
    assert Gallery.from_listing(listing, settings).index.root == in_rooms.index.root

    Image.new("RGB", (120, 90), (200, 180, 40)).save(rooms / "room0.png")
    assert Gallery.from_listing(listing, settings).index.root != in_rooms.index.root
    fewer = settings.with_overrides(identify_gallery_room_views=1)
    assert Gallery.from_listing(listing, fewer).index.root != in_rooms.index.root


def test_room_photos_may_be_listed_in_a_file_and_bad_sources_are_clear_errors(tmp_path):
    listing, rooms = _studio_listing(tmp_path), _rooms_folder(tmp_path)
    named = tmp_path / "rooms.txt"
    named.write_text(f"{rooms / 'room1.png'}\n\n{rooms / 'room2.png'}\n")
    from_file = Gallery.from_listing(listing, _settings(
        tmp_path, identify_gallery_backgrounds=str(named), identify_gallery_room_views=1))
    assert len(from_file.index) == 4

    (tmp_path / "empty").mkdir()
    (tmp_path / "gone.txt").write_text(f"{tmp_path / 'nowhere.jpg'}\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "room.jpg").write_bytes(b"not a photo")
    for source, message in [(tmp_path / "missing", "does not exist"),
                            (tmp_path / "empty", "names no photo"),
                            (tmp_path / "gone.txt", r"nowhere.jpg \(listed in"),
                            (tmp_path / "broken", "identify_gallery_backgrounds: .*room.jpg")]:
        with pytest.raises(IdentifyError, match=message):
            Gallery.from_listing(listing, _settings(
                tmp_path, identify_gallery_backgrounds=str(source)))


def test_a_big_folder_of_room_photos_is_thinned_evenly_to_the_cap(tmp_path, monkeypatch):
    rooms = tmp_path / "rooms"
    rooms.mkdir()
    for n in range(10):
        Image.new("RGB", (40, 30), (10 * n, 40, 200)).save(rooms / f"room{n}.png")
    monkeypatch.setattr(identify_module, "MAX_GALLERY_BACKGROUNDS", 4)
    got = identify_module.gallery_backgrounds(
        _settings(tmp_path, identify_gallery_backgrounds=str(rooms)))
    assert [p.name for p in got] == ["room0.png", "room2.png", "room5.png", "room7.png"]


def test_room_view_settings_come_from_the_environment_and_nonsense_is_refused():
    from shoplens.config import ConfigError

    got = Settings.from_env({"SHOPLENS_IDENTIFY_GALLERY_BACKGROUNDS": "/srv/rooms",
                             "SHOPLENS_IDENTIFY_GALLERY_ROOM_VIEWS": "4",
                             "SHOPLENS_IDENTIFY_GALLERY_CLEAN_WEIGHT": "1.5"})
    assert (got.identify_gallery_backgrounds, got.identify_gallery_room_views,
            got.identify_gallery_clean_weight) == ("/srv/rooms", 4, 1.5)
    for bad in ({"identify_gallery_room_views": 0}, {"identify_gallery_clean_weight": -1.0}):
        with pytest.raises(ConfigError):
            Settings().with_overrides(**bad)


def test_the_ikea_benchmark_gives_the_head_only_tune_half_rooms_as_backgrounds(tmp_path,
                                                                                monkeypatch):
    """Room-like views never see a held-out room: the benchmark writes the tune half's rooms,
    and training reads the backgrounds listed there and nothing else; its features cache is
    reused by a second head without reading a photo."""
    from benchmark_modules import load_benchmark
    from modeling import identify_head
    from modeling.embedding import HeadTraining

    bench = load_benchmark("identify_ikea")
    rooms_dir = tmp_path / "rooms"
    rooms_dir.mkdir()
    for n in range(12):
        Image.new("RGB", (80, 60), (40 + 10 * n, 90, 160)).save(rooms_dir / f"room-{n}.jpg")
    halves = {p.name: bench.split_of(p.name) for p in rooms_dir.iterdir()}
    assert set(halves.values()) == {"tune", "report"}
    listing = tmp_path / "tune_rooms.txt"
    assert bench.main(["--write-tune-rooms", str(listing), "--rooms", str(rooms_dir)]) == 0
    backgrounds = identify_head.background_photos(listing)
    assert sorted(p.name for p in backgrounds) == sorted(n for n, h in halves.items() if h == "tune")

    objects = tmp_path / "objects"
    objects.mkdir()
    for n, colour in enumerate([(200, 30, 30), (30, 160, 30), (30, 30, 200), (200, 200, 30)]):
        _studio_photo(colour, (40 + 5 * n, 30)).save(objects / f"300.000.0{n}.png")
    photos = identify_head.training_photos(objects, set())
    read = []
    real_read = identify_head.images.read_file
    monkeypatch.setattr(identify_head.images, "read_file",
                        lambda path, *a, **k: read.append(Path(path).name) or real_read(path, *a, **k))
    cache = tmp_path / "feats.npz"
    trained = identify_head.train(photos, _settings(tmp_path), views=0, room_views=2,
                                  backgrounds=backgrounds, features_cache=cache,
                                  cfg=HeadTraining(epochs=2, dim=8))
    assert trained.dim == 8 and trained.report["room_views"] == 2
    read_rooms = {n for n in read if n.startswith("room-")}
    assert read_rooms == {n for n, h in halves.items() if h == "tune"}
    read.clear()
    smaller = identify_head.train(photos, _settings(tmp_path), views=0, room_views=2,
                                  backgrounds=backgrounds, features_cache=cache,
                                  cfg=HeadTraining(epochs=2, dim=4))
    assert smaller.dim == 4 and read == []


# --- cost options: the reduced decode and identify's own detector ------------------------------
class RecordingDetector:
    """One chair box at fixed shares of whatever image it is given; records the images' sizes."""

    SHARES = (0.125, 0.25, 0.525, 0.78)

    def __init__(self):
        self.sizes = []

    def detect(self, image, original_size=None):
        self.sizes.append(image.size)
        w, h = image.size
        s = self.SHARES
        return [Box("chair", 0.9, s[0] * w, s[1] * h, s[2] * w, s[3] * h)]


def _big_sideways_jpeg(path) -> tuple[int, int]:
    """The room photo at 1600 x 1200, stored as a phone does (sideways, EXIF orientation 6)."""
    upright = _room_photo().resize((1600, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=90, exif=exif.tobytes())
    return upright.size


@pytest.mark.parametrize("side", [0, 400])
def test_a_photo_decoded_reduced_is_detected_upright_and_small_and_answered_in_full_size_pixels(
        gallery_dir, tmp_path, monkeypatch, side):
    listing, _ = gallery_dir
    room = tmp_path / "phone.jpg"
    width, height = _big_sideways_jpeg(room)
    asked = []
    real_decode = identify_module.decode_photo
    monkeypatch.setattr(identify_module, "decode_photo",  # the one decoder, spied on
                        lambda data, limits, reduce_to=None: asked.append(reduce_to) or
                        real_decode(data, limits, reduce_to=reduce_to))
    detector = RecordingDetector()
    code, [line], _ = _run(["--gallery", str(listing), "--json", str(room)],
                           _settings(tmp_path, identify_decode_side=side), detector)
    assert code == 0 and asked == [side or None]
    [seen] = detector.sizes
    assert seen[0] > seen[1]  # upright: the EXIF orientation was applied
    if side:
        assert side <= max(seen) < width and seen[0] / seen[1] == pytest.approx(width / height, rel=0.01)
    else:
        assert seen == (width, height)
    [obj] = line["objects"]
    expected = [s * (width if i % 2 == 0 else height) for i, s in enumerate(RecordingDetector.SHARES)]
    assert obj["box"] == pytest.approx(expected, abs=1.0)


def test_the_cost_options_are_settings_from_the_environment_and_bad_sides_are_refused(monkeypatch):
    from shoplens.config import ConfigError

    monkeypatch.setenv("SHOPLENS_IDENTIFY_DECODE_SIDE", "512")
    monkeypatch.setenv("SHOPLENS_IDENTIFY_DETECTOR_MODEL_PATH", "/models/int8.onnx")
    s = Settings.from_env()
    assert s.identify_decode_side == 512 and s.identify_detector_model_path == "/models/int8.onnx"
    assert Settings().identify_detector_model_path == ""  # the filter's model unless set
    with pytest.raises(ConfigError, match="identify_decode_side"):
        Settings().with_overrides(identify_decode_side=16)


@pytest.mark.parametrize("own_model", [True, False])
def test_identify_runs_its_own_detector_model_when_one_is_set_else_the_filters(
        gallery_dir, tmp_path, own_model):
    listing, room = gallery_dir
    settings = _settings(tmp_path, detector_model_path=str(tmp_path / "filter.onnx"),
                         identify_detector_model_path=str(tmp_path / "int8.onnx") if own_model else "")
    code, _, err = _run(["--gallery", str(listing), str(room)], settings, None)
    assert code == 2
    assert ("int8.onnx" in err) == own_model and ("filter.onnx" in err) != own_model
