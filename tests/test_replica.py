"""The replica shop serves store.ohou.se's interface (docs/replica.md) and keeps an honest answer key."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from crawler.replica import ReplicaShop
from crawler.replica.catalog import build_catalog
from crawler.replica.faults import FaultSpecError
from crawler.replica.listings import ListingError, category_id_for
from crawler.replica.stats import Stats
from crawler.replica.synthetic import synthetic_sources
from tests.conftest import REPO, shared_path

NEXT_DATA = re.compile(r'<script id="__NEXT_DATA__" type="application/json">(.*?)</script>', re.S)


@pytest.fixture(scope="session")
def photo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("replica-photos")


@pytest.fixture(scope="session")
def small_sources(photo_cache):
    """6 categories x (2 learnable + 1-2 sparse) generated products, 3-6 photos each."""
    return synthetic_sources(seed=3, cache_dir=photo_cache, products_per_category=2,
                             photos_per_product=(3, 6))


@pytest.fixture(scope="module")
def shop(small_sources):
    with ReplicaShop(sources=small_sources, seed=3) as running:
        yield running


def admitted(shop: ReplicaShop, referer_path: str = "/goods/1") -> requests.Session:
    """A client holding a valid WAF cookie, as a browser would have computed it."""
    session = requests.Session()
    session.cookies.set("ohs_waf", shop.runtime.waf.mint())
    session.headers["Referer"] = shop.base_url + referer_path
    return session


def next_data(html: str) -> dict:
    return json.loads(NEXT_DATA.search(html).group(1))


def ranks_data(shop, client, category_id, build_id=None):
    build_id = build_id or shop.catalog.build_id
    return client.get(f"{shop.base_url}/_next/data/{build_id}/ko-KR/ranks.json",
                      params={"type": "best", "category_id": category_id})


def all_reviews(shop, client, product_id, order="best", per=4):
    reviews, page = [], 1
    while True:
        body = client.get(f"{shop.base_url}/api/goods/reviews", params={
            "productionId": product_id, "page": page, "per": per, "order": order}).json()
        if not body["reviews"]:
            return reviews, body
        reviews += body["reviews"]
        page += 1


# --- determinism -----------------------------------------------------------------------------
def test_same_seed_gives_the_same_shop_and_another_seed_another(small_sources):
    def summary(seed):
        catalog = build_catalog(small_sources, seed)
        return [(p.id, p.name, p.brand, p.price, [(r.id, r.created_at, r.stars, r.writer, r.comment,
                                                   r.photo_id) for r in p.reviews])
                for p in sorted(catalog.products.values(), key=lambda p: p.key)]

    assert summary(3) == summary(3)
    assert summary(3) != summary(4)
    # Source order does not matter, only content and seed.
    assert build_catalog(list(reversed(small_sources)), 3).build_id == build_catalog(
        small_sources, 3).build_id


def test_generated_photos_are_identical_for_a_seed(tmp_path):
    first = synthetic_sources(5, tmp_path / "a", products_per_category=1, photos_per_product=(1, 2))
    second = synthetic_sources(5, tmp_path / "b", products_per_category=1, photos_per_product=(1, 2))
    first_bytes = [p.read_bytes() for s in first for p in s.photos]
    assert first_bytes == [p.read_bytes() for s in second for p in s.photos]
    assert len(set(first_bytes)) == len(first_bytes)  # every photo is a different picture
    for path in (p for s in first for p in s.photos):
        with Image.open(path) as image:
            assert 320 <= image.width <= 640 and 320 <= image.height <= 640


def test_review_ids_grow_with_the_date_and_every_product_has_text_reviews(shop):
    reviews = [r for p in shop.catalog.products.values() for r in p.reviews]
    by_id = sorted(reviews, key=lambda r: r.id)
    assert [r.created_at for r in by_id] == sorted(r.created_at for r in reviews)
    for product in shop.catalog.products.values():
        assert 100_000 <= product.id < 100_000_000
        if any(r.photo_id for r in product.reviews):
            assert any(r.photo_id is None for r in product.reviews)


def test_category_names_map_to_shop_ids():
    assert category_id_for("침대") == "10120000"
    assert category_id_for("16220000") == "16220000"
    derived = category_id_for("Apples")
    assert re.fullmatch(r"\d{8}", derived) and derived == category_id_for("Apples")


# --- shop pages and JSON ------------------------------------------------------------------------
def test_robots_txt_disallows_admin_exhibitions_and_export(shop):
    text = requests.get(shop.base_url + "/robots.txt").text
    assert "User-agent: *" in text
    for rule in ("Disallow: /__replica/", "Disallow: /exhibitions/",
                 "Disallow: /api/goods/reviews/export", "Allow: /"):
        assert rule in text


def test_ranks_page_carries_build_id_but_no_products(shop):
    html = requests.get(shop.base_url + "/ranks", params={"type": "best",
                                                         "category_id": "10120000"}).text
    data = next_data(html)
    assert data["page"] == "/ranks" and data["buildId"] == shop.catalog.build_id
    assert data["props"]["pageProps"] == {}
    assert f'src="/_next/static/{shop.catalog.build_id}/_buildManifest.js"' in html
    assert "document.cookie" in html


def test_ranks_data_lists_products_by_review_count(shop):
    client = admitted(shop)
    truth = shop.ground_truth()
    for category in truth["categories"]:
        response = ranks_data(shop, client, category["id"])
        assert response.status_code == 200
        queries = response.json()["pageProps"]["dehydratedState"]["queries"]
        assert queries[0]["state"]["data"]["category"] == {"id": category["id"],
                                                            "title": category["name"]}
        products = queries[1]["state"]["data"]["products"]
        assert [p["id"] for p in products] == category["product_ids_by_rank"]
        keys = [(-p["reviewCount"], p["id"]) for p in products]
        assert keys == sorted(keys)
        expected = {p["id"]: p["review_count"] for p in truth["products"]}
        assert all(p["reviewCount"] == expected[p["id"]] for p in products)
        assert set(products[0]) == {"id", "brandName", "name", "reviewCount", "reviewAvg",
                                    "sellingPrice", "originalImageUrl"}


def test_ranks_data_unknown_build_is_404_and_unknown_category_is_empty(small_sources):
    with ReplicaShop(sources=small_sources, seed=3) as shop:
        client = admitted(shop)
        assert ranks_data(shop, client, "10120000", build_id="stale-build").status_code == 404
        empty = ranks_data(shop, client, "99999999").json()
        assert empty["pageProps"]["dehydratedState"]["queries"][1]["state"]["data"]["products"] == []
        old = shop.catalog.build_id
        new = shop.deploy()
        assert new != old
        assert ranks_data(shop, client, "10120000", build_id=old).status_code == 404
        assert ranks_data(shop, client, "10120000", build_id=new).status_code == 200


def test_product_page_embeds_production_categories_and_first_reviews(shop):
    truth = shop.ground_truth()
    product = max(truth["products"], key=lambda p: p["review_count"])
    html = requests.get(f"{shop.base_url}/goods/{product['id']}").text
    assert "document.cookie" in html
    queries = next_data(html)["props"]["pageProps"]["dehydratedState"]["queries"]
    datas = [q["state"]["data"] for q in queries]
    production = next(d for d in datas if "production" in d)
    assert production["production"] == {
        "id": product["id"], "name": product["name"], "brandName": product["brand"],
        "sellingPrice": product["price"], "originalImageUrl": production["production"][
            "originalImageUrl"], "reviewCount": product["review_count"],
        "reviewAvg": product["rating"]}
    assert production["categories"][0]["id"] == product["category_id"]
    review = next(d for d in datas if "review" in d)["review"]
    assert review["totalCount"] == product["review_count"]
    assert len(review["reviews"]) == min(5, product["review_count"])
    assert requests.get(f"{shop.base_url}/goods/123").status_code == 404


def test_reviews_paginate_to_the_end_including_reviews_without_photos(shop):
    client = admitted(shop)
    truth = shop.ground_truth()
    product = max(truth["products"], key=lambda p: p["review_count"])
    reviews, last = all_reviews(shop, client, product["id"], per=4)
    assert last["reviews"] == [] and last["totalCount"] == product["review_count"]
    assert len(reviews) == product["review_count"] == len({r["id"] for r in reviews})
    with_photo = [r for r in reviews if r.get("card")]
    assert len(with_photo) == product["photo_review_count"]
    assert len(with_photo) < len(reviews)
    first = with_photo[0]
    assert set(first) >= {"id", "createdAt", "writerNickname", "review", "productionInformation",
                          "reviewType", "praiseCount", "card"}
    assert re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", first["createdAt"])
    assert set(first["review"]) == {"starAvg", "comment", "type", "badges"}
    card = first["card"]
    assert re.fullmatch(re.escape(shop.cdn_url) + r"/apne2/any/uploads/cards/snapshots/\d{18}\.jpg",
                        card["imageUrl"])
    assert card["imgUrl"] == card["imageUrl"] + "?w=360&h=360&c=c"
    assert card["imgUrlPc"] == card["imageUrl"] + "?w=720"
    praise = [r["praiseCount"] for r in reviews]
    assert praise == sorted(praise, reverse=True)  # order=best


def test_recent_order_is_newest_first(shop):
    client = admitted(shop)
    product = max(shop.ground_truth()["products"], key=lambda p: p["review_count"])
    reviews, _ = all_reviews(shop, client, product["id"], order="recent", per=5)
    keys = [(r["createdAt"], r["id"]) for r in reviews]
    assert keys == sorted(keys, reverse=True)


def test_star_counts_agree_with_the_reviews(shop):
    client = admitted(shop)
    for product in shop.ground_truth()["products"][:4]:
        reviews, last = all_reviews(shop, client, product["id"], per=50)
        counts = client.get(f"{shop.base_url}/api/goods/reviews/counts-for-stars",
                            params={"productionId": product["id"]}).json()
        for star in range(1, 6):
            expected = sum(1 for r in reviews if r["review"]["starAvg"] == star)
            assert counts[f"countFor{star}"] == expected
            assert last["reviewStarCount"][str(star)] == expected


def test_bad_review_queries_get_clear_errors(shop):
    client = admitted(shop)
    product_id = shop.ground_truth()["products"][0]["id"]
    url = f"{shop.base_url}/api/goods/reviews"
    assert client.get(url, params={"productionId": 1}).status_code == 404
    assert client.get(url, params={"productionId": product_id, "per": 51}).status_code == 400
    response = client.get(url, params={"productionId": product_id, "page": "x"})
    assert response.status_code == 400 and "integers" in response.json()["error"]


# --- WAF -------------------------------------------------------------------------------------
def test_json_endpoints_deny_plain_http_clients(shop):
    product_id = shop.ground_truth()["products"][0]["id"]
    plain = requests.Session()
    page = plain.get(f"{shop.base_url}/goods/{product_id}")
    assert page.status_code == 200 and "set-cookie" not in {k.lower() for k in page.headers}
    assert not plain.cookies
    denied = plain.get(f"{shop.base_url}/api/goods/reviews", params={"productionId": product_id},
                       headers={"Referer": f"{shop.base_url}/goods/{product_id}"})
    assert denied.status_code == 403 and "Access Denied" in denied.text
    assert ranks_data(shop, plain, "10120000").status_code == 403


def test_expired_forged_or_refererless_requests_are_denied(shop):
    product_id = shop.ground_truth()["products"][0]["id"]
    url = f"{shop.base_url}/api/goods/reviews"
    expired = admitted(shop)
    expired.cookies.set("ohs_waf", shop.runtime.waf.mint(time.time() - 3600 - 5))
    assert expired.get(url, params={"productionId": product_id}).status_code == 403
    forged = admitted(shop)
    token = shop.runtime.waf.mint()
    forged.cookies.set("ohs_waf", token[:-1] + ("0" if token[-1] != "0" else "1"))
    assert forged.get(url, params={"productionId": product_id}).status_code == 403
    no_referer = admitted(shop)
    del no_referer.headers["Referer"]
    assert no_referer.get(url, params={"productionId": product_id}).status_code == 403
    elsewhere = admitted(shop)
    elsewhere.headers["Referer"] = "http://127.0.0.9/goods/1"
    assert elsewhere.get(url, params={"productionId": product_id}).status_code == 403
    assert admitted(shop).get(url, params={"productionId": product_id}).status_code == 200
    blocked = shop.stats()["blocked"]
    assert blocked["expired"] >= 1 and blocked["invalid"] >= 1 and blocked["no_referer"] >= 2


def test_with_the_waf_off_pages_set_no_cookie_and_calls_need_none(small_sources):
    with ReplicaShop(sources=small_sources, seed=3, waf=False) as shop:
        product_id = shop.ground_truth()["products"][0]["id"]
        page = requests.get(f"{shop.base_url}/goods/{product_id}").text
        assert "document.cookie" not in page and "Set-Cookie" not in page
        url = f"{shop.base_url}/api/goods/reviews"
        referer = {"Referer": f"{shop.base_url}/goods/{product_id}"}
        assert requests.get(url, params={"productionId": product_id},
                            headers=referer).status_code == 200
        assert requests.get(url, params={"productionId": product_id}).status_code == 403


def test_with_the_challenge_page_option_a_refused_call_gets_the_js_challenge_with_status_200(
        small_sources):
    """``waf_challenge_page``: the WAF answers a refused JSON call with its challenge page (the
    cookie script), status 200 and HTML, never 403; a call with a valid cookie gets its JSON."""
    with ReplicaShop(sources=small_sources, seed=3, waf_challenge_page=True) as shop:
        product_id = shop.ground_truth()["products"][0]["id"]
        url = f"{shop.base_url}/api/goods/reviews"
        referer = {"Referer": f"{shop.base_url}/goods/{product_id}"}
        challenged = requests.get(url, params={"productionId": product_id}, headers=referer)
        assert challenged.status_code == 200
        assert challenged.headers["Content-Type"].startswith("text/html")
        assert "document.cookie" in challenged.text and "ohs_waf" in challenged.text
        assert admitted(shop).get(url, params={"productionId": product_id}).json()["reviews"]
        assert shop.stats()["blocked"]["missing"] == 1 and "403" not in shop.stats()["status"]


def test_a_real_headless_chromium_obtains_the_cookie_and_it_expires(small_sources):
    from playwright.sync_api import sync_playwright

    with ReplicaShop(sources=small_sources, seed=3, cookie_ttl=3) as shop:
        product_id = shop.ground_truth()["products"][0]["id"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page()
                page.goto(f"{shop.base_url}/goods/{product_id}", wait_until="load")
                cookies = {c["name"]: c["value"] for c in page.context.cookies()}
            finally:
                browser.close()
        assert "ohs_waf" in cookies
        client = requests.Session()
        client.cookies.set("ohs_waf", cookies["ohs_waf"])
        client.headers["Referer"] = f"{shop.base_url}/goods/{product_id}"
        url = f"{shop.base_url}/api/goods/reviews"
        assert client.get(url, params={"productionId": product_id}).status_code == 200
        time.sleep(4.1)  # past the 3 s cookie TTL
        assert client.get(url, params={"productionId": product_id}).status_code == 403


# --- CDN ---------------------------------------------------------------------------------------
def _image(response) -> Image.Image:
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_cdn_serves_original_bytes_without_params_and_resizes_deterministically(shop):
    review = next(r for r in shop.catalog.photos.values())
    url = f"{shop.cdn_url}/apne2/any/uploads/cards/snapshots/{review.photo_id}.jpg"
    original = requests.get(url)
    assert original.content == review.photo_path.read_bytes()
    assert original.headers["Content-Type"] == "image/jpeg"
    width, height = _image(original).size
    bounded = requests.get(url, params={"w": 200, "h": 150})
    small = _image(bounded)
    assert small.width <= 200 and small.height <= 150 and max(small.width / 200, small.height / 150) > 0.99
    assert abs(small.width / small.height - width / height) < 0.02
    assert requests.get(url, params={"w": 200, "h": 150}).content == bounded.content
    assert _image(requests.get(url, params={"w": 100, "h": 100, "c": "c"})).size == (100, 100)
    assert requests.get(url, params={"w": 5000, "h": 5000}).content == original.content
    webp = requests.get(url, params={"w": 120, "webp": 1})
    assert webp.headers["Content-Type"] == "image/webp" and _image(webp).format == "WEBP"
    low = requests.get(url, params={"w": 200, "q": 20}).content
    assert len(low) < len(requests.get(url, params={"w": 200, "q": 95}).content)
    assert requests.get(url, params={"w": "big"}).status_code == 400
    product = next(iter(shop.catalog.products.values()))
    catalogue_image = requests.get(f"{shop.cdn_url}/apne2/any/uploads/productions/"
                                   f"v1-{product.image_id}.jpg", params={"w": 100})
    assert catalogue_image.status_code == 200 and _image(catalogue_image).width <= 100
    missing = f"{shop.cdn_url}/apne2/any/uploads/cards/snapshots/{'1' * 18}.jpg"
    assert requests.get(missing).status_code == 404


def test_ground_truth_hashes_match_downloaded_photos_and_record_what_was_served(small_sources):
    with ReplicaShop(sources=small_sources, seed=3) as shop:
        truth = shop.ground_truth()
        photo_reviews = [r for r in truth["reviews"] if r["photo_id"]]
        assert photo_reviews
        for review in photo_reviews:
            body = requests.get(review["photo_url"]).content
            assert hashlib.sha256(body).hexdigest() == review["photo_sha256"]
        resized = requests.get(photo_reviews[0]["photo_url"], params={"w": 64}).content
        served = shop.ground_truth()["served"]
        assert set(served) == {r["photo_id"] for r in photo_reviews}
        assert hashlib.sha256(resized).hexdigest() in served[photo_reviews[0]["photo_id"]]
        over_http = requests.get(f"{shop.base_url}/__replica/ground-truth.json",
                                 headers={"X-Replica-Admin": "1"}).json()
        assert over_http["reviews"] == shop.ground_truth()["reviews"]


# --- faults ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faulty(small_sources):
    with ReplicaShop(sources=small_sources, seed=3, hang_seconds=0.4) as running:
        yield running


def _review_url(shop):
    product_id = shop.catalog.ranked("10120000")[0].id
    return f"{shop.base_url}/api/goods/reviews?productionId={product_id}"


def _photo_url(shop):
    photo_id = next(iter(shop.catalog.photos))
    return f"{shop.cdn_url}/apne2/any/uploads/cards/snapshots/{photo_id}.jpg"


def test_fault_500_and_429_with_retry_after(faulty):
    client = admitted(faulty)
    faulty.set_faults("500=1")
    assert client.get(_review_url(faulty)).status_code == 500
    assert requests.get(_photo_url(faulty)).status_code == 500
    faulty.set_faults("429=1")
    response = client.get(_review_url(faulty))
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    faulty.set_faults("")
    assert client.get(_review_url(faulty)).status_code == 200


def test_fault_hang_delays_then_answers(faulty):
    client = admitted(faulty)
    faulty.set_faults("hang=1")
    started = time.monotonic()
    response = client.get(_review_url(faulty))
    assert time.monotonic() - started >= 0.4
    assert response.status_code == 200 and "reviews" in response.json()
    faulty.set_faults("")


def test_fault_truncate_sends_half_of_the_declared_length(faulty):
    faulty.set_faults("truncate=1")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(_photo_url(faulty))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        admitted(faulty).get(_review_url(faulty))
    faulty.set_faults("")


def test_fault_html_answers_json_endpoints_with_an_error_page(faulty):
    faulty.set_faults("html=1")
    response = admitted(faulty).get(_review_url(faulty))
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    faulty.set_faults("")


def test_fault_corrupt_image_and_offsite_redirect(faulty):
    faulty.set_faults("corrupt=1")
    response = requests.get(_photo_url(faulty))
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/jpeg"
    with pytest.raises(Exception):
        _image(response)
    faulty.set_faults("offsite=1")
    redirect = requests.get(_photo_url(faulty), allow_redirects=False)
    assert redirect.status_code == 302
    assert redirect.headers["Location"].startswith(f"http://127.0.0.2:{faulty.cdn_port}/apne2/")
    faulty.set_faults("")


def test_pages_only_get_500s_and_robots_none(faulty):
    faulty.set_faults("all=1")
    product_id = faulty.catalog.ranked("10120000")[0].id
    assert requests.get(f"{faulty.base_url}/goods/{product_id}").status_code == 500
    assert requests.get(f"{faulty.base_url}/robots.txt").status_code == 200
    faulty.set_faults("")


def test_faults_are_counted_logged_and_transient(faulty):
    before = faulty.stats()["faults"].get("500", 0)
    faulty.set_faults("500=0.5")
    client = admitted(faulty)
    statuses = [client.get(_review_url(faulty)).status_code for _ in range(12)]
    faulty.set_faults("")
    assert 500 in statuses and 200 in statuses  # the same URL fails, then a retry succeeds
    assert faulty.stats()["faults"]["500"] - before == statuses.count(500)
    logged = [f for f in faulty.ground_truth()["faults"] if f["url"] == _review_url(faulty)
              and f["kind"] == "500"]
    assert len(logged) >= statuses.count(500)


def test_fault_draws_are_reproducible_per_seed(small_sources):
    def statuses(seed):
        with ReplicaShop(sources=small_sources, seed=seed, faults="500=0.5") as shop:
            client = admitted(shop)
            return [client.get(_review_url(shop)).status_code for _ in range(16)]

    first = statuses(3)
    assert first == statuses(3)  # same seed, same requests: same faults (ports differ)
    assert first != statuses(4)


def test_bad_fault_specs_are_rejected_clearly():
    from crawler.replica.faults import FaultPlan
    for spec, message in (("teapot=0.1", "kind one of"), ("500=2", r"\[0, 1\]"),
                          ("500=abc", "not a number"), ("500=0.6,429=0.6", "add up")):
        with pytest.raises(FaultSpecError, match=message):
            FaultPlan(spec)


def test_hostile_data_serves_every_kind_on_its_endpoint_deterministically(faulty):
    """``hostile-data=1``: every product serves one malformed answer, the kinds dealt in turn,
    fixed per seed, recorded in the ground truth; the raw text carries what json.dumps never
    writes (1e400, Infinity, lone surrogates, deep nesting)."""
    from crawler.replica.hostile import KINDS, PRODUCT_PAGE_KINDS

    faulty.set_faults("hostile-data=1")
    try:
        truth = faulty.ground_truth()
        assert truth["hostile"] == faulty.ground_truth()["hostile"]  # stable between calls
        hostile = {h["product_id"]: h for h in truth["hostile"]}
        assert set(hostile) == {p["id"] for p in truth["products"]}
        assert {h["kind"] for h in hostile.values()} == set(KINDS)
        client = admitted(faulty)
        markers = {"product_id_overflow": str(2 ** 70), "review_count_overflow": "3000000000",
                   "queries_not_objects": '{"state":"x"},null', "deep_nesting": "[" * 1000,
                   "infinity_id": '"id":Infinity', "review_id_1e400": '"id":1e400',
                   "review_id_bool": '"id":true', "review_id_overflow": str(2 ** 70),
                   "nul_and_surrogate": "\\u0000after\\ud800", "reviews_not_a_list": '"reviews":{',
                   "photo_protocol_relative": '"imageUrl":"//127.0.0.1:',
                   "photo_relative": '"imageUrl":"/apne2/', "photo_javascript": "javascript:",
                   "photo_bad_port": ":99999/apne2/"}
        seen = set()
        for product_id, h in hostile.items():
            if h["kind"] in PRODUCT_PAGE_KINDS:
                text = requests.get(f"{faulty.base_url}/goods/{product_id}").text
            else:
                text = client.get(f"{faulty.base_url}/api/goods/reviews", params={
                    "productionId": product_id, "page": 1, "per": 5, "order": "recent"}).text
                assert h["review_id"] is not None and str(h["review_id"]) in text or h["kind"] in (
                    "review_id_1e400", "review_id_bool", "review_id_overflow",
                    "review_id_fraction")
            if h["kind"] in markers:
                assert markers[h["kind"]] in text, h
            seen.add(h["kind"])
        assert seen == set(KINDS)
        assert faulty.stats()["faults"]["hostile-data"] >= len(hostile)
    finally:
        faulty.set_faults("")
    assert faulty.ground_truth()["hostile"] == []


# --- bad photos, hold-back -------------------------------------------------------------------
def test_bad_photos_are_permanent_and_marked(small_sources):
    with ReplicaShop(sources=small_sources, seed=3, bad_photos=0.25) as shop:
        truth = shop.ground_truth()
        bad = [r for r in truth["reviews"] if r["bad"]]
        assert {r["bad"] for r in bad} == {"bomb", "not_image", "truncated_file", "wrong_type"}
        for review in bad:
            for _ in range(2):  # permanent: the same answer every time
                response = requests.get(review["photo_url"])
                assert response.status_code == 200
                assert hashlib.sha256(response.content).hexdigest() == review["photo_sha256"]
            kind = review["bad"]
            if kind == "bomb":
                assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
                assert response.content[16:24] == (30000).to_bytes(4, "big") * 2  # IHDR size
                with pytest.raises(Image.DecompressionBombError):
                    Image.open(io.BytesIO(response.content))
            elif kind == "not_image":
                assert response.headers["Content-Type"] == "image/jpeg"
                assert response.content.lstrip().startswith(b"<!DOCTYPE html")
            elif kind == "truncated_file":
                with pytest.raises(OSError):
                    _image(response)
            else:
                assert response.headers["Content-Type"].startswith("text/plain")
        assert not set(shop.ground_truth()["served"]) & {r["photo_id"] for r in bad}


def test_hold_back_hides_newest_photo_reviews_until_released(small_sources, tmp_path):
    truth_file = tmp_path / "truth.json"
    with ReplicaShop(sources=small_sources, seed=3, hold_back=3,
                     ground_truth_path=truth_file) as shop:
        truth = shop.ground_truth()
        held = truth["held_back"]
        assert len(held) == 3 and json.loads(truth_file.read_text())["held_back"] == held
        published_ids = {r["id"] for r in truth["reviews"]}
        assert not published_ids & set(held)
        assert min(held) > max(r["id"] for r in truth["reviews"] if r["photo_id"])
        held_review = next(r for p in shop.catalog.products.values() for r in p.reviews
                           if r.id == held[0])
        product = shop.catalog.products[held_review.product_id]
        client = admitted(shop)

        def api_view():
            reviews, last = all_reviews(shop, client, product.id, order="recent", per=50)
            ranking = ranks_data(shop, client, product.category_id).json()
            listed = next(p for p in ranking["pageProps"]["dehydratedState"]["queries"][1]["state"]
                          ["data"]["products"] if p["id"] == product.id)
            return {r["id"] for r in reviews}, last["totalCount"], listed["reviewCount"]

        ids, total, listed_count = api_view()
        assert held[0] not in ids and total == listed_count
        released = shop.release(1)
        assert released == [held[0]]
        ids_after, total_after, listed_after = api_view()
        assert held[0] in ids_after and total_after == total + 1 == listed_after
        assert json.loads(truth_file.read_text())["held_back"] == held[1:]
        over_http = requests.post(f"{shop.base_url}/__replica/release", params={"n": 5},
                                  headers={"X-Replica-Admin": "1"}).json()
        assert over_http == {"released": held[1:], "held_back": 0}
        assert {r["id"] for r in shop.ground_truth()["reviews"]} >= set(held)


# --- stats ---------------------------------------------------------------------------------------
def test_stats_measure_concurrency_gaps_and_disallowed_hits(small_sources):
    with ReplicaShop(sources=small_sources, seed=3, hang_seconds=0.5) as shop:
        shop.set_faults("hang=1")
        client = admitted(shop)
        threads = [threading.Thread(target=client.get, args=(_review_url(shop),)) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shop.set_faults("")
        host = shop.base_url.removeprefix("http://")
        assert shop.stats()["hosts"][host]["max_in_flight"] == 3
        requests.get(f"{shop.base_url}/exhibitions/123")
        requests.get(f"{shop.base_url}/__replica/stats")  # a crawler ignoring robots.txt
        requests.get(f"{shop.base_url}/__replica/stats", headers={"X-Replica-Admin": "1"})
        stats = shop.stats()
        assert stats["disallowed_hits"] == 2
        assert stats["disallowed_paths"] == ["/exhibitions/123", "/__replica/stats"]

    with ReplicaShop(sources=small_sources, seed=3) as shop:
        for _ in range(3):
            requests.get(f"{shop.base_url}/robots.txt")
            time.sleep(0.3)
        host = shop.stats()["hosts"][shop.base_url.removeprefix("http://")]
        assert host["requests"] == 3 and host["max_in_flight"] == 1
        assert host["min_gap_s"] >= 0.3


def test_stats_average_in_flight_counts_only_busy_time_weighted_by_duration():
    now = [0.0]
    stats = Stats(clock=lambda: now[0])
    first = stats.begin("cdn", "/img/1.jpg", "image", "ua")
    now[0] = 1.0
    second = stats.begin("cdn", "/img/2.jpg", "image", "ua")
    now[0] = 2.0
    stats.end(first)
    now[0] = 3.0
    stats.end(second)
    now[0] = 10.0  # seven idle seconds: a client that leaves the host idle is not averaged down
    third = stats.begin("cdn", "/img/3.jpg", "image", "ua")
    now[0] = 11.0
    stats.end(third)
    host = stats.snapshot()["hosts"]["cdn"]
    # busy 0-3 s and 10-11 s; in flight: 1 for 1 s, 2 for 1 s, 1 for 1 s, 1 for 1 s
    assert host["busy_s"] == 4.0 and host["in_flight_s"] == 5.0
    assert host["mean_in_flight_while_busy"] == 1.25
    assert host["max_in_flight"] == 2 and host["in_flight"] == 0


# --- listings and CLI --------------------------------------------------------------------------
def test_listing_csv_and_photo_folder_sources(tmp_path, small_sources):
    photos = [p for s in small_sources for p in s.photos][:4]
    listing = tmp_path / "listing.csv"
    with listing.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["category", "product", "photo"])
        for i, photo in enumerate(photos):
            writer.writerow(["침대" if i < 2 else "Lamps", f"item-{i % 2}", str(photo)])
    with ReplicaShop(listing=listing, seed=1) as shop:
        truth = shop.ground_truth()
    assert {c["id"] for c in truth["categories"]} == {"10120000", category_id_for("Lamps")}
    assert sorted(p["name"] for p in truth["products"]) == ["item-0", "item-0", "item-1", "item-1"]
    bad = tmp_path / "bad.csv"
    bad.write_text("category,product\nx,y\n")
    with pytest.raises(ListingError, match="lacks column"):
        ReplicaShop(listing=bad)


def test_cli_serves_and_prints_its_address(tmp_path, small_sources):
    photos = [p for s in small_sources for p in s.photos][:2]
    listing = tmp_path / "listing.csv"
    listing.write_text("category,product,photo\n" + "".join(
        f"테이블,table-{i},{p}\n" for i, p in enumerate(photos)))
    truth_file = tmp_path / "truth.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler.replica", "--listing", str(listing), "--port", "0",
         "--cdn-port", "0", "--ground-truth", str(truth_file)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"replica listening on (http://127\.0\.0\.1:\d+) "
                             r"\(cdn (http://127\.0\.0\.1:\d+)\)\n", line)
        assert match, line
        assert requests.get(match.group(1) + "/robots.txt").status_code == 200
        assert len(json.loads(truth_file.read_text())["products"]) == 2
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    failed = subprocess.run([sys.executable, "-m", "crawler.replica", "--listing",
                             str(tmp_path / "nope.csv")], cwd=REPO, capture_output=True, text=True)
    assert failed.returncode == 2 and "no such file" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_grocery_listing_covers_every_train_photo_in_six_categories(tmp_path):
    root = shared_path("datasets", "grocery")
    out = tmp_path / "grocery.csv"
    done = subprocess.run([sys.executable, "-m", "crawler.replica", "grocery-listing", "--root",
                           str(root), "--split", "train", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["category", "category_id", "product", "photo"]
    listed = {Path(r["photo"]) for r in rows}
    train = {(root / line.split(",")[0]).resolve()
             for line in (root / "train.txt").read_text().splitlines() if line.strip()}
    assert listed == train
    products_by_category: dict[str, set[str]] = {}
    for row in rows:
        products_by_category.setdefault(row["category_id"], set()).add(row["product"])
    assert len(products_by_category) == 6
    assert sum(len(p) for p in products_by_category.values()) == 81
    assert all(len(p) <= 20 for p in products_by_category.values())
    assert "Granny-Smith" in set().union(*products_by_category.values())
