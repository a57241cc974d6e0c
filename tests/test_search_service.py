"""The search service (issue 16 item 5, issue 17 item 3): ``POST /search`` answers a photo with
the top-3 products of the served index, ``POST /identify`` every detected product in it with its
box and top-3; both refuse bad uploads with a 4xx and a message; a new index is picked up without
a restart; the page at ``/`` lets a person upload a photo, see the boxes, click one and see that
product's name (in headless Chromium), and falls back to the whole photo without a detector.

The index is a small calibrated one over drawn photos of 3 products (random-initialised backbone
at 32 px with a trained projection), built once for the module. The detector is a stub that
returns the boxes where the test drew the products (the real one is tests/test_identify.py's)."""
from __future__ import annotations

import contextlib
import io
import shutil
import threading

import pytest
from PIL import Image

from drawn_products import SHAPES as DRAWN, drawn_photo
from modeling.embedding import Embedder, HeadTraining, train_embedding
from modeling.search_index import SearchIndex
from shoplens.config import Settings

SHAPES = {p: DRAWN[p] for p in (1, 2, 3)}
MAX_BYTES, MAX_PIXELS = 200_000, 500_000
# As tests/test_ui_browser.py launches Debian's Chromium.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


_photo = drawn_photo
# A shop shelf: product 1 (red ellipse) pasted at the left, product 3 (green triangle) at the right.
SHELF_SIZE = (224, 112)
SHELF_BOXES = {1: (16.0, 24.0, 80.0, 88.0), 3: (144.0, 24.0, 208.0, 88.0)}


def _shelf() -> Image.Image:
    shelf = Image.new("RGB", SHELF_SIZE, (120, 110, 100))
    for product, (x0, y0, _, _) in SHELF_BOXES.items():
        shelf.paste(_photo(product, 2), (int(x0), int(y0)))
    return shelf


class StubDetector:
    """Returns the boxes it was given, whatever the photo (as ``Detector.detect`` does)."""

    def __init__(self, boxes):
        self.boxes = boxes

    def detect(self, image, original_size=None):
        return list(self.boxes)


def _shelf_detector() -> StubDetector:
    from shoplens.vision.detector import Box

    return StubDetector([Box("chair", 0.91, *SHELF_BOXES[1]), Box("couch", 0.62, *SHELF_BOXES[3])])


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return Settings().with_overrides(model_init="random", max_image_bytes=MAX_BYTES,
                                     max_image_pixels=MAX_PIXELS,
                                     search_cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def built_index(tmp_path_factory, settings):
    """A saved, calibrated index over 3 drawn products (template, copied per test)."""
    root = tmp_path_factory.mktemp("search-service") / "index"
    base = Embedder("efficientnet_lite0", 32, settings=settings)
    photos = {(p, v): _photo(p, v) for p in SHAPES for v in range(3)}
    trained = train_embedding(base, list(photos.values()), [p for p, _ in photos], views=1,
                              cfg=HeadTraining(dim=16, epochs=2))
    index = SearchIndex(trained)
    index.add_products([{"product_id": p, "name": f"{c} {s}"} for p, (c, s) in SHAPES.items()])
    index.add_photos([(img, p, f"p{p}-{v}") for (p, v), img in photos.items()])
    index.calibrate(trained.embed_decoded(list(photos.values())), [p for p, _ in photos])
    index.save(root)
    return root


@pytest.fixture
def index_dir(built_index, tmp_path):
    target = tmp_path / "index"
    shutil.copytree(built_index, target)
    return target


@pytest.fixture
def client(index_dir, settings):
    from fastapi.testclient import TestClient

    from modeling.search_service import create_app

    with TestClient(create_app(index_dir, settings)) as c:
        yield c


@pytest.fixture
def identify_client(index_dir, settings):
    from fastapi.testclient import TestClient

    from modeling.search_service import create_app

    with TestClient(create_app(index_dir, settings, detector=_shelf_detector())) as c:
        yield c


def _search(client, data: bytes, name="photo.png", field="photo", path="/search"):
    return client.post(path, files={field: (name, data, "application/octet-stream")})


def test_a_photo_of_an_enrolled_product_gets_that_product_first_among_three(client):
    response = _search(client, _png(_photo(2, 1)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [hit["product_id"] for hit in body["top"]][0] == 2
    assert len(body["top"]) == 3 and body["top"][0]["name"] == "blue rectangle"
    assert isinstance(body["confident"], bool)
    assert body["confidence"]["rule"] == body["index"]["confidence_rule"] == "combined"
    assert {"product_id", "name", "score"} <= set(body["top"][0])
    scores = [hit["score"] for hit in body["top"]]
    assert scores == sorted(scores, reverse=True)
    assert body["index"]["vectors"] == 9


BAD_UPLOADS = [
    (None, 400, "no_file", "no photo uploaded"),
    (b"", 400, "empty_image", "empty file"),
    (b"<html>not a photo</html>", 415, "not_image", "not a readable image"),
    (_png(_photo(1, 0))[:300], 422, "truncated_image", "cut off"),
    # 1000x1000 of one colour: a few KB on the wire, a million pixels once decoded.
    (_png(Image.new("RGB", (1000, 1000), "white")), 413, "image_too_large", "max_image_pixels"),
    (b"\xff" * (MAX_BYTES + 10), 413, "image_too_large", "max_image_bytes"),
    (b"\xff" * (MAX_BYTES * 3), 413, "image_too_large", "request body"),
]


@pytest.mark.parametrize("path", ["/search", "/identify"])
@pytest.mark.parametrize("upload, status, reason, words", BAD_UPLOADS)
def test_bad_uploads_get_a_4xx_with_the_decoders_reason_and_a_message(identify_client, path,
                                                                      upload, status, reason,
                                                                      words):
    """Each refusal names its reason code (the decoder's) and says what is wrong in words."""
    if upload is None:
        response = identify_client.post(path, data={"note": "forgot the photo"})
    else:
        response = _search(identify_client, upload, path=path)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == reason and words in body["message"]


def test_identify_answers_each_detected_product_with_its_box_class_and_top_three(identify_client):
    response = _search(identify_client, _png(_shelf()), path="/identify")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"image", "objects", "index"}
    assert body["image"] == {"width": SHELF_SIZE[0], "height": SHELF_SIZE[1]}
    assert body["index"]["vectors"] == 9
    chair, couch = body["objects"]  # best detection first
    for obj, product, label, score in ((chair, 1, "chair", 0.91), (couch, 3, "couch", 0.62)):
        assert set(obj) == {"box", "class", "score", "confident", "top"}
        assert obj["box"] == list(SHELF_BOXES[product])  # image pixels
        assert obj["class"] == label and obj["score"] == pytest.approx(score)
        assert isinstance(obj["confident"], bool) and len(obj["top"]) == 3
        assert obj["top"][0]["product_id"] == product
        assert obj["top"][0]["name"] == " ".join(SHAPES[product])
        scores = [hit["score"] for hit in obj["top"]]
        assert scores == sorted(scores, reverse=True)


def test_identify_with_nothing_detected_answers_the_whole_photo_as_search_does(index_dir,
                                                                              settings):
    from fastapi.testclient import TestClient

    from modeling.search_service import create_app

    photo = _png(_photo(2, 1))
    with TestClient(create_app(index_dir, settings, detector=StubDetector([]))) as client:
        body = _search(client, photo, path="/identify").json()
        searched = _search(client, photo).json()
    [whole] = body["objects"]
    assert whole["box"] == [0.0, 0.0, 64.0, 64.0]
    assert whole["class"] is None and whole["score"] is None
    assert [h["product_id"] for h in whole["top"]] == [h["product_id"] for h in searched["top"]]
    assert whole["top"][0]["name"] == "blue rectangle"
    assert whole["confident"] == searched["confident"]


def test_identify_without_a_detector_model_is_a_clear_503(index_dir, settings, tmp_path):
    from fastapi.testclient import TestClient

    from modeling.search_service import create_app

    missing = settings.with_overrides(detector_model_path=str(tmp_path / "no-such.onnx"))
    for app in (create_app(index_dir, missing), create_app(index_dir, settings, detector=None)):
        with TestClient(app) as client:
            response = _search(client, _png(_shelf()), path="/identify")
            assert response.status_code == 503
            assert response.json()["error"] == "no_detector"
            assert "POST /search" in response.json()["message"]
            assert _search(client, _png(_shelf())).status_code == 200  # search still answers
    with TestClient(create_app(index_dir, missing)) as client:
        assert "no-such.onnx" in _search(client, _png(_shelf()), path="/identify").text


def test_a_new_index_saved_into_the_directory_is_served_without_restart(client, index_dir,
                                                                       settings):
    """The nightly build rewrites the directory; the next request is answered from it, with the
    product details (price, shop link, thumbnail) the new product table carries."""
    photo = _png(_photo(1, 0))
    assert _search(client, photo).json()["top"][0]["name"] == "red ellipse"
    tonight = SearchIndex.load(index_dir, settings)
    tonight.add_products([{"product_id": 1, "name": "red ellipse lamp", "price": "29,000 KRW",
                           "url": "https://shop.example/p/1",
                           "thumbnail_url": "https://cdn.example/1.jpg"}])
    tonight.save(index_dir)

    best = _search(client, photo).json()["top"][0]
    assert best["name"] == "red ellipse lamp"
    assert best["price"] == "29,000 KRW" and best["url"] == "https://shop.example/p/1"
    assert best["thumbnail_url"] == "https://cdn.example/1.jpg"


def test_a_broken_new_index_is_not_loaded_and_the_previous_one_keeps_serving(client, index_dir):
    (index_dir / "index.json").write_text("{ half written")
    response = _search(client, _png(_photo(3, 0)))
    assert response.status_code == 200
    assert response.json()["top"][0]["name"] == "green triangle"


def test_the_page_is_self_contained_and_offers_the_camera(client):
    html = client.get("/").text
    assert 'accept="image/*"' in html and 'capture="environment"' in html
    assert "http://" not in html and "https://" not in html  # no CDN: works offline


def test_serve_refuses_a_directory_without_an_index_and_says_what_to_do(tmp_path, capsys):
    from modeling.search_service import main

    assert main(["--index", str(tmp_path / "nothing")]) == 2
    assert "make demo" in capsys.readouterr().err


@contextlib.contextmanager
def _page_on(app):
    """A Chromium page (Debian's, headless) on the app served by a real uvicorn."""
    import uvicorn
    from playwright.sync_api import sync_playwright

    from shoplens.dev.services import free_port_block, wait_for_port

    port = free_port_block(1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port, 30)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                yield page
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_without_a_detector_the_page_searches_the_whole_photo_and_shows_the_products_name(
        index_dir, settings, tmp_path):
    """Headless Chromium: no detector here (/identify is 503), so the page asks /search and
    choosing a photo shows the matching product."""
    from modeling.search_service import create_app

    photo = tmp_path / "product.png"
    _photo(3, 2).save(photo)
    with _page_on(create_app(index_dir, settings, detector=None)) as page:
        page.set_input_files("#photo", str(photo))
        first = page.locator("#results li").first
        first.wait_for(timeout=30_000)
        assert first.get_attribute("data-product-id") == "3"
        assert first.locator(".name").inner_text() == "green triangle"
        assert page.locator("#results li").count() == 3
        assert page.locator("#frame .box").count() == 0


def test_a_person_sees_a_box_on_each_product_and_clicking_one_shows_that_products_name(
        index_dir, settings, tmp_path):
    """Headless Chromium: the shelf photo gets a box over each detected product, drawn where the
    detector found it at the photo's displayed size; the best detection's matches show first,
    and clicking the other box shows its product's."""
    from modeling.search_service import create_app

    photo = tmp_path / "shelf.png"
    _shelf().save(photo)
    with _page_on(create_app(index_dir, settings, detector=_shelf_detector())) as page:
        page.set_viewport_size({"width": 200, "height": 700})  # narrower than the photo
        page.set_input_files("#photo", str(photo))
        boxes = page.locator("#frame .box")
        boxes.nth(1).wait_for(timeout=30_000)
        assert boxes.count() == 2
        assert page.locator("#found").inner_text().startswith("2 products found")
        assert "1. chair" in boxes.nth(0).inner_text() and "2. couch" in boxes.nth(1).inner_text()

        shown = page.locator("#preview").bounding_box()
        scale = shown["width"] / SHELF_SIZE[0]
        assert scale < 0.9  # shown smaller than its pixels: the boxes must scale with it
        for nth, product in ((0, 1), (1, 3)):
            drawn = boxes.nth(nth).bounding_box()
            x0, y0, x1, y1 = SHELF_BOXES[product]
            assert drawn["x"] - shown["x"] == pytest.approx(x0 * scale, abs=2)
            assert drawn["y"] - shown["y"] == pytest.approx(y0 * scale, abs=2)
            assert drawn["width"] == pytest.approx((x1 - x0) * scale, abs=2)

        first = page.locator("#results li").first
        assert first.locator(".name").inner_text() == "red ellipse"
        assert boxes.nth(0).get_attribute("aria-pressed") == "true"

        boxes.nth(1).click()
        page.wait_for_function(
            "document.querySelector('#results li')?.dataset.productId === '3'", timeout=10_000)
        assert first.locator(".name").inner_text() == "green triangle"
        assert page.locator("#results li").count() == 3
        assert page.locator("#status").inner_text().startswith("2. couch")
        assert boxes.nth(1).get_attribute("aria-pressed") == "true"
        assert boxes.nth(0).get_attribute("aria-pressed") == "false"


def test_identify_on_a_reduced_decode_answers_boxes_and_size_in_the_uploaded_photos_pixels(
        index_dir, settings):
    from fastapi.testclient import TestClient

    from modeling.search_service import create_app
    from shoplens.vision.detector import Box

    class ShareDetector:  # the chair box at the same shares of whatever image it is given
        seen = []

        def detect(self, image, original_size=None):
            self.seen.append(image.size)
            x0, y0, x1, y1 = SHELF_BOXES[1]
            w, h = image.size
            return [Box("chair", 0.9, x0 / SHELF_SIZE[0] * w, y0 / SHELF_SIZE[1] * h,
                        x1 / SHELF_SIZE[0] * w, y1 / SHELF_SIZE[1] * h)]

    big = _shelf().resize((SHELF_SIZE[0] * 4, SHELF_SIZE[1] * 4))  # under max_image_pixels
    out = io.BytesIO()
    big.save(out, "JPEG", quality=90)
    detector = ShareDetector()
    app = create_app(index_dir, settings.with_overrides(identify_decode_side=112), detector=detector)
    with TestClient(app) as client:
        body = _search(client, out.getvalue(), name="big.jpg", path="/identify").json()
    assert max(detector.seen[0]) < big.width  # detected on the reduced decode
    assert body["image"] == {"width": big.width, "height": big.height}
    [chair] = body["objects"]
    assert chair["box"] == pytest.approx([4 * c for c in SHELF_BOXES[1]], abs=1.0)
