"""Each ranked product's catalogue image (the shop's ``originalImageUrl``): parsed by the site
adapter, downloaded once per address, validated and stored like a review photo (content-addressed
object, one decoder) and recorded in ``catalogue_images`` with its provenance.

The crawl tests run the replica shop, SeaweedFS and a PostgreSQL manifest (fixtures of
tests/conftest.py and tests/test_crawl.py).
"""
from __future__ import annotations

import hashlib
import json
import urllib.request

import pytest
import sqlalchemy as sa
from scrapy import Request

import crawler
from crawler.site import BAD_CATALOGUE_IMAGE_URL, ShopSite
from shoplens.manifest import engine_for
from shoplens.store import ObjectStore
from test_crawl import (CATEGORY, assert_store_and_manifest_agree, crawl_run,  # noqa: F401
                        crawl_settings, expected_products, photo_reviews, query, replica,
                        stored_photos)

SITE = ShopSite("https://shop.test", "w=1280&h=1280")
RANKS_URL = "https://shop.test/_next/data/b1/ko-KR/ranks.json?type=best&category_id=1"
PRODUCT_URL = "https://shop.test/goods/7"


def _ranking(**product) -> bytes:
    return json.dumps({"pageProps": {"dehydratedState": {"queries": [{"state": {"data": {
        "products": [{"id": 7, "name": "bed", **product}]}}}]}}}).encode()


def _product_page(**production) -> str:
    data = {"props": {"pageProps": {"dehydratedState": {"queries": [{"state": {"data": {
        "production": {"id": 7, "name": "bed", **production}}}}]}}}}
    return (f'<html><script id="__NEXT_DATA__" type="application/json">{json.dumps(data)}'
            f'</script></html>')


# --- the adapter ----------------------------------------------------------------------------
@pytest.mark.parametrize("raw, address", [
    ("https://cdn.test/apne2/any/uploads/productions/v1-1.jpg?w=720&q=30",
     "https://cdn.test/apne2/any/uploads/productions/v1-1.jpg"),  # resize parameters dropped
    ("//cdn.test/v1-2.jpg", "https://cdn.test/v1-2.jpg"),  # protocol-relative: the page's scheme
    ("/uploads/v1-3.jpg", "https://shop.test/uploads/v1-3.jpg"),  # relative: the page's host
])
def test_the_catalogue_image_address_is_resolved_against_the_page_without_parameters(raw,
                                                                                     address):
    (product,) = SITE.parse_ranking(_ranking(originalImageUrl=raw), RANKS_URL).products
    assert (product.image_url, product.image_error) == (address, None)
    page = SITE.parse_product_page(_product_page(originalImageUrl=raw), PRODUCT_URL)
    assert (page.image_url, page.image_error) == (address, None)


@pytest.mark.parametrize("raw", [
    "javascript:alert(document.cookie)", "data:image/png;base64,iVBORw0KGgo=",
    "ftp://cdn.test/a.jpg", "https://cdn.test:99999/a.jpg", "https://user:pw@cdn.test/a.jpg",
    "https://cdn.test:0/a.jpg", "https://cdn.test/a\x00.jpg", "   ",
    "https://cdn.test/" + "a" * 3000,
    12345, True, ["https://cdn.test/a.jpg"], {"url": "https://cdn.test/a.jpg"},
])
def test_a_malformed_catalogue_image_address_is_rejected_and_the_product_kept(raw):
    (product,) = SITE.parse_ranking(_ranking(originalImageUrl=raw), RANKS_URL).products
    assert (product.id, product.image_url) == (7, None)
    assert product.image_error.reason == BAD_CATALOGUE_IMAGE_URL
    page = SITE.parse_product_page(_product_page(originalImageUrl=raw), PRODUCT_URL)
    assert (page.id, page.image_url) == (7, None)
    assert page.image_error.reason == BAD_CATALOGUE_IMAGE_URL


@pytest.mark.parametrize("extra", [{}, {"originalImageUrl": None}, {"originalImageUrl": ""}])
def test_a_product_without_a_catalogue_image_has_neither_address_nor_error(extra):
    (product,) = SITE.parse_ranking(_ranking(**extra), RANKS_URL).products
    assert (product.image_url, product.image_error) == (None, None)
    page = SITE.parse_product_page(_product_page(**extra), PRODUCT_URL)
    assert (page.image_url, page.image_error) == (None, None)


# --- the spider's decision ------------------------------------------------------------------
def test_each_products_catalogue_image_is_asked_for_once_a_night_unless_known():
    """From the first answer that gives it; not when the manifest holds that address or an
    earlier night refused its bytes; an unusable address is recorded, never raised."""
    import asyncio

    from crawler.manifest_writer import ProductState
    from test_crawl_units import SHOP, _spider

    spider = _spider(SHOP)
    fresh, known, refused, moved, bad = 1, 2, 3, 4, 5
    spider.states = {
        fresh: ProductState(), bad: ProductState(),
        known: ProductState(catalogue_url="http://cdn.test:81/k.jpg"),
        refused: ProductState(catalogue_refused={"http://cdn.test:81/r.jpg?w=1280&h=1280"}),
        moved: ProductState(catalogue_url="http://cdn.test:81/old.jpg")}
    ranking = Request("http://shop.test/ranks.json")

    def ask(product_id, address, error=None):
        return asyncio.run(spider._catalogue_image_request(ranking, product_id, address, error))

    first = ask(fresh, "http://cdn.test:81/f.jpg")
    assert first.url == "http://cdn.test:81/f.jpg?w=1280&h=1280"  # at the one fixed size
    assert (first.meta["stage"], first.meta["product_id"], first.meta["catalogue_url"]) == (
        "catalogue_image", fresh, "http://cdn.test:81/f.jpg")
    assert first.meta["download_maxsize"] == SHOP.max_image_bytes
    assert ask(fresh, "http://cdn.test:81/f.jpg") is None  # once a night (the product page too)
    assert ask(known, "http://cdn.test:81/k.jpg") is None  # unchanged: not downloaded again
    assert ask(refused, "http://cdn.test:81/r.jpg") is None  # its bytes were refused before
    assert ask(moved, "http://cdn.test:81/new.jpg").meta["catalogue_url"] == (
        "http://cdn.test:81/new.jpg")  # a new address replaces the stored image
    _, error = ShopSite.catalogue_image("javascript:alert(1)", "http://shop.test/")
    assert ask(bad, None, error) is None
    assert spider.recorded == [(BAD_CATALOGUE_IMAGE_URL, None)]
    assert spider.crawler.stats.values["shoplens/catalogue_images_requested"] == 2
    assert spider.crawler.stats.values["shoplens/catalogue_images_unchanged"] == 2


# --- the manifest row -----------------------------------------------------------------------
def test_the_latest_catalogue_image_of_a_product_wins(manifest_url):
    from crawler.manifest_writer import CatalogueImageRow, ManifestWriter, ensure_run

    runs = [ensure_run(manifest_url, key, "http://shop.test", {}) for key in ("n1", "n2")]
    with engine_for(manifest_url).begin() as conn:
        conn.execute(sa.text("INSERT INTO categories (id, name, source_url, first_seen_run, "
                             "last_seen_run) VALUES ('1', 'c', 'u', :r, :r)"), {"r": runs[0]})
        conn.execute(sa.text("INSERT INTO products (id, category_id, name, source_url, "
                             "first_seen_run, last_seen_run) VALUES (5, '1', 'p', 'u', :r, :r)"),
                     {"r": runs[0]})

    def row(name: str) -> CatalogueImageRow:
        sha = hashlib.sha256(name.encode()).hexdigest()
        return CatalogueImageRow(product_id=5, sha256=sha, object_key=f"images/{sha}.jpg",
                                 source_url=f"http://cdn.test/{name}.jpg", size_bytes=10,
                                 width=4, height=3, format="jpeg")

    ManifestWriter(manifest_url, runs[0]).record_catalogue_image(row("old"))
    ManifestWriter(manifest_url, runs[1]).record_catalogue_image(row("new"))
    new = row("new")
    assert query(manifest_url, "SELECT product_id, sha256, source_url, run_id FROM "
                               "catalogue_images") == [(5, new.sha256, new.source_url, runs[1])]


# --- crawls of the replica ------------------------------------------------------------------
def _catalogue_rows(url: str) -> dict[int, tuple]:
    return {r[0]: r[1:] for r in query(
        url, "SELECT ci.product_id, ci.sha256, ci.object_key, ci.source_url, ci.size_bytes, "
             "ci.width, ci.height, ci.format, c.run_key FROM catalogue_images ci "
             "JOIN crawl_runs c ON c.id = ci.run_id")}


def _catalogue_requests(shop) -> int:
    return shop.stats()["requests"].get("catalogue_image", 0)


def test_a_crawl_stores_each_products_catalogue_image_once_with_its_provenance(
        replica, s3_settings, manifest_url):
    shop = replica([4, 3, 5])
    settings = crawl_settings(shop, s3_settings, manifest_url)
    first = crawl_run(settings, "night-1")
    truth = shop.ground_truth()
    products = {p["id"]: p for p in truth["products"]}
    ranked = expected_products(truth, settings.best_n)[CATEGORY]
    assert len(ranked) == 3

    rows = _catalogue_rows(manifest_url)
    assert set(rows) == set(ranked)
    store = ObjectStore(settings)
    for product_id, (sha, key, source, size, width, height, fmt, run_key) in rows.items():
        assert (source, run_key) == (products[product_id]["image_url"], "night-1")
        body = store.get_bytes(key)  # the object is in the store, under its content address
        assert hashlib.sha256(body).hexdigest() == sha and key == f"images/{sha[:2]}/{sha}.jpg"
        assert (len(body), fmt) == (size, "jpeg") and width > 0 and height > 0
    assert (first["catalogue_images_stored"], first["catalogue_images_failed"]) == (3, 0)
    # Review photos are stored as before, next to the catalogue images.
    assert set(stored_photos(manifest_url)) == set(photo_reviews(truth, ranked))

    # Nothing changed: the next night downloads no catalogue image and keeps the rows as they are.
    downloads = _catalogue_requests(shop)
    crawler.start_run(settings, "night-2")
    stats = crawler.crawl_category(settings, CATEGORY, "night-2")
    second = crawler.finish_run(settings, "night-2")
    assert _catalogue_requests(shop) == downloads == 3
    assert (stats["catalogue_images_unchanged"], stats["catalogue_images_requested"]) == (3, 0)
    assert _catalogue_rows(manifest_url) == rows
    assert (second["catalogue_images_stored"], second["catalogue_images_total"]) == (0, 3)

    # What is stored is what the CDN serves for the address at the crawl's one fixed size.
    for product_id, (sha, *_rest) in rows.items():
        url = f"{products[product_id]['image_url']}?{settings.image_params}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert hashlib.sha256(answer.read()).hexdigest() == sha


def test_an_undecodable_catalogue_image_is_a_failure_row_and_the_crawl_succeeds(
        replica, s3_settings, manifest_url):
    shop = replica([3, 4, 2])
    truth = shop.ground_truth()
    ranked = expected_products(truth, 20)[CATEGORY]
    broken, not_image = ranked[0], ranked[1]
    shop.catalog.products[broken].image_bad = "truncated_file"
    shop.catalog.products[not_image].image_bad = "not_image"
    settings = crawl_settings(shop, s3_settings, manifest_url, retry_times=1)

    summary = crawl_run(settings, "night-1")  # raises if a category failed
    assert query(manifest_url, "SELECT status FROM crawl_runs") == [("success",)]
    assert set(query(manifest_url, "SELECT product_id, stage, reason FROM crawl_failures")) == {
        (broken, "catalogue_image", "truncated_image"),
        (not_image, "catalogue_image", "not_image")}
    assert set(_catalogue_rows(manifest_url)) == set(ranked) - {broken, not_image}
    assert (summary["catalogue_images_stored"], summary["catalogue_images_failed"]) == (1, 2)
    # The products themselves, their reviews and photos are crawled whole.
    assert set(stored_photos(manifest_url)) == set(photo_reviews(shop.ground_truth(), ranked))
    assert_store_and_manifest_agree(settings)  # nothing stored of the refused bytes

    # Bytes refused for their content are not downloaded again while the address stays.
    downloads = _catalogue_requests(shop)
    crawl_run(settings, "night-2")
    assert _catalogue_requests(shop) == downloads
    assert set(_catalogue_rows(manifest_url)) == set(ranked) - {broken, not_image}
