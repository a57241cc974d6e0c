"""The search service (issue 16 item 5): ``POST /search`` answers a photo with the top-3 products
of the served index, refuses bad uploads with a 4xx and a message, picks up a new index without
a restart, and the page at ``/`` lets a person upload a photo and see the product's name (in
headless Chromium).

The index is a small calibrated one over drawn photos of 3 products (random-initialised backbone
at 32 px with a trained projection), built once for the module."""
from __future__ import annotations

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


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def settings():
    return Settings().with_overrides(model_init="random", max_image_bytes=MAX_BYTES,
                                     max_image_pixels=MAX_PIXELS)


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


def _search(client, data: bytes, name="photo.png", field="photo"):
    return client.post("/search", files={field: (name, data, "application/octet-stream")})


def test_a_photo_of_an_enrolled_product_gets_that_product_first_among_three(client):
    response = _search(client, _png(_photo(2, 1)))
    assert response.status_code == 200, response.text
    body = response.json()
    assert [hit["product_id"] for hit in body["top"]][0] == 2
    assert len(body["top"]) == 3 and body["top"][0]["name"] == "blue rectangle"
    assert isinstance(body["confident"], bool)
    assert {"product_id", "name", "score"} <= set(body["top"][0])
    scores = [hit["score"] for hit in body["top"]]
    assert scores == sorted(scores, reverse=True)
    assert body["index"]["vectors"] == 9


@pytest.mark.parametrize("upload, status, reason, words", [
    (None, 400, "no_file", "no photo uploaded"),
    (b"", 400, "empty_image", "empty file"),
    (b"<html>not a photo</html>", 415, "not_image", "not a readable image"),
    (_png(_photo(1, 0))[:300], 422, "truncated_image", "cut off"),
    # 1000x1000 of one colour: a few KB on the wire, a million pixels once decoded.
    (_png(Image.new("RGB", (1000, 1000), "white")), 413, "image_too_large", "max_image_pixels"),
    (b"\xff" * (MAX_BYTES + 10), 413, "image_too_large", "max_image_bytes"),
    (b"\xff" * (MAX_BYTES * 3), 413, "image_too_large", "request body"),
])
def test_bad_uploads_get_a_4xx_with_the_decoders_reason_and_a_message(client, upload, status,
                                                                      reason, words):
    """Each refusal names its reason code (the decoder's) and says what is wrong in words."""
    if upload is None:
        response = client.post("/search", data={"note": "forgot the photo"})
    else:
        response = _search(client, upload)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == reason and words in body["message"]


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


def test_a_person_uploads_a_photo_on_the_page_and_sees_the_products_name(index_dir, settings,
                                                                        tmp_path):
    """Headless Chromium on a real uvicorn: choosing a photo shows the matching product."""
    import uvicorn
    from playwright.sync_api import sync_playwright

    from modeling.search_service import create_app
    from shoplens.dev.services import free_port_block, wait_for_port

    port = free_port_block(1)
    server = uvicorn.Server(uvicorn.Config(create_app(index_dir, settings), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port, 30)
        photo = tmp_path / "shelf.png"
        _photo(3, 2).save(photo)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                        args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#photo", str(photo))
            first = page.locator("#results li").first
            first.wait_for(timeout=30_000)
            assert first.get_attribute("data-product-id") == "3"
            assert first.locator(".name").inner_text() == "green triangle"
            assert page.locator("#results li").count() == 3
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
