"""The crawl stage against the replica shop, with a real PostgreSQL manifest and real SeaweedFS.

Each test builds a tiny photo catalogue (a few products, a few dozen small photos), runs the
replica in-process on free ports, crawls it through the public entries (which run Scrapy in a
child process) and compares the manifest and the bucket with the replica's ground truth.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

import crawler
from crawler.replica import ReplicaShop
from crawler.run import PACKAGE_ROOT, CrawlError, settings_env
from shoplens.config import HTTP_CLIENTS
from shoplens.manifest import engine_for
from shoplens.dev.services import SeaweedFS, free_port_block
from shoplens.store import ObjectStore

CATEGORY = "10120000"  # 침대
BAD_REASON_FOR_KIND = {"bomb": "image_too_large", "not_image": "not_image",
                       "truncated_file": "truncated_image", "wrong_type": "wrong_content_type"}


# --- catalogue and settings ------------------------------------------------------------------
def make_photo_dir(root: Path, photos_per_product: list[int], seed: int = 0,
                   category: str = "침대") -> Path:
    """``root/<category>/<product>/*.jpg``: small noisy JPEGs, every one distinct."""
    rng = np.random.default_rng(seed)
    for p, count in enumerate(photos_per_product):
        folder = root / category / f"product-{p}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=80)
    return root


def crawl_settings(shop: ReplicaShop, s3_settings, manifest_url: str, **overrides):
    base = dict(manifest_url=manifest_url, shop_base_url=shop.base_url,
                allowed_hosts=[urlsplit(shop.cdn_url).netloc], categories=[CATEGORY],
                best_n=20, download_delay=0.01, autothrottle=False, download_timeout=5.0,
                retry_times=3, retry_after_cap=1.0, reviews_per_page=5, concurrent_per_host=3)
    return s3_settings.with_overrides(**{**base, **overrides})


def crawl_run(settings, run_key: str) -> dict:
    crawler.start_run(settings, run_key)
    for category_id in settings.categories:
        crawler.crawl_category(settings, category_id, run_key)
    return crawler.finish_run(settings, run_key)


# --- reading the ground truth and the manifest ----------------------------------------------
def expected_products(truth: dict, best_n: int) -> dict[str, list[int]]:
    return {c["id"]: c["product_ids_by_rank"][:best_n] for c in truth["categories"]}


def photo_reviews(truth: dict, product_ids, good: bool = True) -> dict[int, dict]:
    ids = set(product_ids)
    return {r["id"]: r for r in truth["reviews"]
            if r["product_id"] in ids and r["photo_id"] and (r["bad"] is None) == good}


def query(url: str, sql: str, **params) -> list[tuple]:
    with engine_for(url).connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(sql), params)]


def stored_photos(url: str) -> dict[int, str]:
    return dict(query(url, "SELECT review_id, sha256 FROM review_photos"))


def assert_store_and_manifest_agree(settings, sample: int | None = None) -> None:
    """Every image row (review photo or catalogue image) has its object with those very bytes,
    and no object lacks a row."""
    store = ObjectStore(settings)
    rows = dict(query(settings.manifest_url, "SELECT object_key, sha256 FROM images UNION "
                                             "SELECT object_key, sha256 FROM catalogue_images"))
    assert set(store.list_keys("images/")) == set(rows)
    keys = sorted(rows)
    if sample is not None:
        keys = random.Random(0).sample(keys, min(sample, len(keys)))
    for key in keys:
        sha = rows[key]
        assert hashlib.sha256(store.get_bytes(key)).hexdigest() == sha


def assert_matches_ground_truth(settings, truth: dict, sample: int | None = None) -> None:
    url = settings.manifest_url
    best = expected_products(truth, settings.best_n)
    crawled = {c: best[c] for c in settings.categories}
    product_ids = [p for ids in crawled.values() for p in ids]
    ranked = query(url, "SELECT category_id, product_id, rank FROM product_ranks r "
                        "JOIN crawl_runs c ON c.id = r.run_id WHERE c.id = (SELECT max(id) FROM "
                        "crawl_runs) ORDER BY category_id, rank")
    assert [(c, p) for c, p, _ in ranked] == [(c, p) for c, ids in crawled.items() for p in ids]
    truth_products = {p["id"]: p for p in truth["products"]}
    for pid, name, brand, price in query(url, "SELECT id, name, brand, price FROM products"):
        assert (name, brand, price) == (truth_products[pid]["name"], truth_products[pid]["brand"],
                                        truth_products[pid]["price"])
    truth_reviews = {r["id"]: r for r in truth["reviews"] if r["product_id"] in set(product_ids)}
    manifest_reviews = {rid: (pid, str(day).replace("-", "."), stars, comment, writer, photo)
                        for rid, pid, day, stars, comment, writer, photo in query(
                            url, "SELECT id, product_id, created_date, stars, comment, "
                                 "writer_nickname, photo_url FROM reviews")}
    assert manifest_reviews == {
        r["id"]: (r["product_id"], r["created_at"], float(r["stars"]), r["comment"], r["writer"],
                  r["photo_url"]) for r in truth_reviews.values()}
    good = photo_reviews(truth, product_ids)
    stored = stored_photos(url)
    assert set(stored) == set(good)
    for review_id, sha in stored.items():
        assert sha in truth["served"][good[review_id]["photo_id"]]
    # Each product's catalogue image, from the address the shop gives for it.
    assert dict(query(url, "SELECT product_id, source_url FROM catalogue_images")) == {
        p: truth_products[p]["image_url"] for p in product_ids
        if truth_products[p]["image_bad"] is None}
    assert_store_and_manifest_agree(settings, sample)


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def replica(tmp_path):
    shops = []

    def start(photos_per_product: list[int], **kwargs) -> ReplicaShop:
        photos = make_photo_dir(tmp_path / f"photos{len(shops)}", photos_per_product,
                                seed=kwargs.pop("photo_seed", len(shops)))
        shop = ReplicaShop(photos=photos, seed=kwargs.pop("seed", 7), **kwargs).start()
        shops.append(shop)
        return shop

    yield start
    for shop in shops:
        shop.stop()


# --- specifications -------------------------------------------------------------------------
def test_crawl_matches_ground_truth_rerun_fetches_nothing_and_release_adds_exactly_the_new(
        replica, s3_settings, manifest_url):
    shop = replica([9, 7, 8, 6, 10], bad_photos=0.1, hold_back=30)
    settings = crawl_settings(shop, s3_settings, manifest_url)

    first = crawl_run(settings, "night-1")
    truth = shop.ground_truth()
    assert_matches_ground_truth(settings, truth)
    assert first["photos_stored"] == len(stored_photos(manifest_url)) > 0

    # Bad photos are rejected, each with the reason its kind calls for, and never stored.
    all_ids = [p for ids in expected_products(truth, settings.best_n).values() for p in ids]
    bad = photo_reviews(truth, all_ids, good=False)
    assert bad, "the catalogue should contain bad photos"
    failures = {rid: reason for rid, reason in query(
        manifest_url, "SELECT review_id, reason FROM crawl_failures WHERE stage = 'image'")}
    assert failures == {rid: BAD_REASON_FOR_KIND[r["bad"]] for rid, r in bad.items()}

    # Politeness, as the shop saw it.
    stats = shop.stats()
    assert stats["requests"].get("robots", 0) >= 1 and stats["disallowed_hits"] == 0
    shop_host, cdn_host = urlsplit(shop.base_url).netloc, urlsplit(shop.cdn_url).netloc
    assert set(stats["hosts"]) <= {shop_host, cdn_host}
    assert all(h["max_in_flight"] <= settings.concurrent_per_host for h in stats["hosts"].values())
    assert set(stats["user_agents"]) == {settings.user_agent}  # the browser says who it is too

    # Nothing changed: the second night downloads no image at all.
    images_before = stats["requests"].get("image", 0)
    second = crawl_run(settings, "night-2")
    assert shop.stats()["requests"].get("image", 0) == images_before
    assert second["photos_stored"] == 0 and second["reviews_new"] == 0

    # 30 new reviews appear: exactly their (good) photos are stored the next night.
    released = set(shop.release(30))
    assert len(released) == 30
    third = crawl_run(settings, "night-3")
    truth = shop.ground_truth()
    assert_matches_ground_truth(settings, truth)
    new_photos = {rid for (rid,) in query(
        manifest_url, "SELECT review_id FROM review_photos rp JOIN crawl_runs c ON c.id = rp.run_id "
                      "WHERE c.run_key = 'night-3'")}
    released_good = {rid for rid in released if truth_review(truth, rid)["bad"] is None}
    assert new_photos == released_good
    assert third["reviews_new"] == 30
    assert third["photos_stored"] == len(released_good)


def truth_review(truth: dict, review_id: int) -> dict:
    return next(r for r in truth["reviews"] if r["id"] == review_id)


def crawl_night(settings, run_key: str) -> dict:
    """One night of the single test category; returns that category's crawl stats."""
    crawler.start_run(settings, run_key)
    stats = crawler.crawl_category(settings, CATEGORY, run_key)
    crawler.finish_run(settings, run_key)
    return stats


def walked_in(url: str) -> dict[int, str]:
    """Each product's run key of its last complete review walk."""
    return dict(query(url, "SELECT p.id, c.run_key FROM products p "
                           "JOIN crawl_runs c ON c.id = p.reviews_synced_run"))


def test_products_unchanged_in_the_ranking_are_not_walked_until_a_change_failure_or_recheck(
        replica, s3_settings, manifest_url):
    """A product whose ranking review count and rating equal those of its last complete walk gets
    no product-page or review request; a product with a new review, one whose walk since then
    failed, and one whose last walk is older than ``recheck_unchanged_days`` are walked again."""
    shop = replica([6, 5, 7, 4], hold_back=1)
    settings = crawl_settings(shop, s3_settings, manifest_url, recheck_unchanged_days=7)
    crawl_night(settings, "night-1")
    products = set(walked_in(manifest_url))
    assert len(products) == 4

    def page_requests() -> tuple[int, int]:
        kinds = shop.stats()["requests"]
        return kinds.get("product_page", 0), kinds.get("reviews", 0)

    # Nothing changed: no product page, no review page.
    before = page_requests()
    quiet = crawl_night(settings, "night-2")
    assert page_requests() == before
    assert (quiet["products_unchanged"], quiet["review_pages"], quiet["reviews_new"]) == (4, 0, 0)

    # A new review: only its product is walked, and its review is stored.
    (released,) = shop.release(1)
    changed = truth_review(shop.ground_truth(), released)["product_id"]
    before = page_requests()
    night = crawl_night(settings, "night-3")
    assert page_requests()[0] == before[0] + 1
    assert (night["products_unchanged"], night["reviews_new"]) == (3, 1)
    assert walked_in(manifest_url) == {p: "night-3" if p == changed else "night-1"
                                       for p in products}
    assert released in stored_photos(manifest_url)

    # A walk that failed half-way leaves a failure row and the older sync: walked again.
    failed = min(products - {changed})
    run_3 = query(manifest_url, "SELECT id FROM crawl_runs WHERE run_key = 'night-3'")[0][0]
    with engine_for(manifest_url).begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO crawl_failures (run_id, category_id, product_id, url, stage, reason) "
            "VALUES (:r, :c, :p, 'http://shop/reviews', 'reviews', 'http_500')"),
            {"r": run_3, "c": CATEGORY, "p": failed})
    night = crawl_night(settings, "night-4")
    assert night["products_unchanged"] == 3
    assert walked_in(manifest_url)[failed] == "night-4"

    # The last walk of the other two is 8 days old: they are re-checked, the rest are not.
    with engine_for(manifest_url).begin() as conn:
        conn.execute(sa.text("UPDATE crawl_runs SET started_at = started_at - interval '8 days' "
                             "WHERE run_key = 'night-1'"))
    night = crawl_night(settings, "night-5")
    assert night["products_unchanged"] == 2
    assert walked_in(manifest_url) == {
        p: {changed: "night-3", failed: "night-4"}.get(p, "night-5") for p in products}


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
def test_with_five_percent_faults_the_run_finishes_and_one_more_run_heals_everything(
        replica, s3_settings, manifest_url, http_client):
    shop = replica([8, 9, 7, 10, 6], faults="all=0.05", bad_photos=0.1, hang_seconds=3,
                   photo_seed=11)
    settings = crawl_settings(shop, s3_settings, manifest_url, best_n=3, download_timeout=1.0,
                              retry_times=4, http_client=http_client)

    crawl_run(settings, "faulty-1")
    truth = shop.ground_truth()
    product_ids = expected_products(truth, 3)[CATEGORY]
    reachable = photo_reviews(truth, product_ids)
    stored = stored_photos(manifest_url)
    assert set(stored) <= set(reachable)  # nothing invalid, nothing outside the best 3
    # Every reachable photo that is missing is explained by a recorded failure: its own, or one
    # of the product or review page that would have led to it.
    failures = query(manifest_url, "SELECT stage, reason, product_id, review_id FROM crawl_failures")
    explained_reviews = {rid for _, _, _, rid in failures if rid}
    explained_products = {pid for stage, _, pid, _ in failures if stage in ("product", "reviews")}
    ranking_failed = any(stage == "ranking" for stage, *_ in failures)
    for rid in set(reachable) - set(stored):
        assert (rid in explained_reviews or reachable[rid]["product_id"] in explained_products
                or ranking_failed), f"photo of review {rid} missing without a recorded failure"
    assert all(reason for _, reason, _, _ in failures)

    faults_injected = shop.stats()["faults"]
    assert sum(faults_injected.values()) > 0, "the replica injected no faults"

    crawl_run(settings, "faulty-2")
    truth = shop.ground_truth()
    stored = stored_photos(manifest_url)
    assert set(stored) == set(reachable)
    for rid, sha in stored.items():
        assert sha in truth["served"][reachable[rid]["photo_id"]]
    assert_store_and_manifest_agree(settings)
    bad = photo_reviews(truth, product_ids, good=False)
    rejected = dict(query(manifest_url, "SELECT DISTINCT review_id, reason FROM crawl_failures "
                                        "WHERE review_id IS NOT NULL AND reason IN "
                                        "('image_too_large','not_image','truncated_image',"
                                        "'wrong_content_type')"))
    for rid, review in bad.items():
        assert rejected.get(rid) == BAD_REASON_FOR_KIND[review["bad"]]


def test_an_expired_waf_cookie_is_renewed_with_the_browser_and_the_crawl_completes(
        replica, s3_settings, manifest_url):
    # The cookie outlives the browser's own start (seconds on a busy machine) but not the crawl.
    shop = replica([10, 9], cookie_ttl=4.0, photo_seed=3)
    settings = crawl_settings(shop, s3_settings, manifest_url, download_delay=0.25,
                              concurrent_per_host=1, reviews_per_page=2)
    crawler.start_run(settings, "ttl")
    stats = crawler.crawl_category(settings, CATEGORY, "ttl")
    crawler.finish_run(settings, "ttl")
    assert stats["waf_cookie_acquired"] >= 2, stats  # the first cookie, then at least one renewal
    assert shop.stats()["status"].get("403", 0) >= 1  # the shop did refuse the expired cookie
    assert stats["failures"] == {}
    assert_matches_ground_truth(settings, shop.ground_truth())


def test_offsite_redirects_are_never_followed_and_are_recorded(replica, s3_settings, manifest_url):
    shop = replica([6, 5], faults="offsite=1.0")
    settings = crawl_settings(shop, s3_settings, manifest_url, retry_times=1, best_n=1)
    crawl_run(settings, "offsite")
    reasons = query(manifest_url, "SELECT DISTINCT stage, reason FROM crawl_failures ORDER BY 1")
    assert reasons == [("catalogue_image", "offsite_redirect"), ("image", "offsite_redirect")]
    truth = shop.ground_truth()
    photo_count = len(photo_reviews(truth, expected_products(truth, 1)[CATEGORY]))
    # Each photo and the one product's catalogue image.
    assert query(manifest_url, "SELECT count(*) FROM crawl_failures")[0][0] == photo_count + 1 > 1
    assert stored_photos(manifest_url) == {}
    assert query(manifest_url, "SELECT count(*) FROM catalogue_images") == [(0,)]
    assert set(shop.stats()["hosts"]) <= {urlsplit(shop.base_url).netloc,
                                          urlsplit(shop.cdn_url).netloc}


def _table_contents(url: str) -> dict[str, set]:
    """Manifest content without run ids and timestamps, for comparing two histories."""
    q = {
        "categories": "SELECT id, name, source_url FROM categories",
        "products": "SELECT id, category_id, name, brand, price, rank, review_count, rating, "
                    "source_url, reviews_synced_run IS NOT NULL FROM products",
        "product_ranks": "SELECT product_id, category_id, rank, review_count, rating, source_url "
                         "FROM product_ranks",
        "reviews": "SELECT id, product_id, created_date, stars, comment, writer_nickname, "
                   "photo_url, source_url FROM reviews",
        "images": "SELECT sha256, object_key, size_bytes, width, height, format, source_url, "
                  "review_id, product_id FROM images",
        "review_photos": "SELECT review_id, sha256 FROM review_photos",
        "catalogue_images": "SELECT product_id, sha256, object_key, source_url, size_bytes, width, "
                            "height, format FROM catalogue_images",
    }
    return {table: set(query(url, sql)) for table, sql in q.items()}


def _store_keys(settings) -> set[str]:
    return set(ObjectStore(settings).list_keys(""))


def _new_bucket(s3_settings):
    settings = s3_settings.with_overrides(s3_bucket=f"t-{uuid.uuid4().hex[:12]}")
    ObjectStore(settings).ensure_bucket()
    return settings


@pytest.fixture
def second_manifest_url():
    """Another fresh, migrated manifest database, for comparing two histories side by side."""
    from tests.conftest import PG_SERVER
    from shoplens.manifest import upgrade

    name = f"shoplens_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_SERVER}/{name}"
    upgrade(url)
    yield url
    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(
        replica, s3_settings, manifest_url, second_manifest_url):
    shop = replica([12, 10, 11, 9], photo_seed=5)
    interrupted = crawl_settings(shop, s3_settings, manifest_url, download_delay=0.15,
                                 concurrent_per_host=1)
    crawler.start_run(interrupted, "night")
    env = {**os.environ, **settings_env(interrupted), "PYTHONPATH": str(PACKAGE_ROOT)}
    child = subprocess.Popen([sys.executable, "-m", "crawler", "crawl", "--category", CATEGORY,
                              "--run-key", "night"], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(stored_photos(manifest_url)) < 5:
        assert child.poll() is None, "the crawl ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    total = len(photo_reviews(shop.ground_truth(), expected_products(
        shop.ground_truth(), 20)[CATEGORY]))
    assert len(stored_photos(manifest_url)) < total, "killed too late to prove anything"

    crawler.crawl_category(interrupted.with_overrides(download_delay=0.01,
                                                      concurrent_per_host=3), CATEGORY, "night")
    crawler.finish_run(interrupted, "night")

    uninterrupted = crawl_settings(shop, _new_bucket(s3_settings), second_manifest_url)
    crawl_run(uninterrupted, "night")

    assert _table_contents(manifest_url) == _table_contents(second_manifest_url)
    assert _store_keys(uninterrupted)  # the comparison is between two real, separate histories
    assert _store_keys(interrupted) == _store_keys(uninterrupted)
    assert_store_and_manifest_agree(interrupted)
    assert_matches_ground_truth(interrupted, shop.ground_truth())


def test_object_store_outage_fails_cleanly_and_a_rerun_completes_without_orphans(
        replica, manifest_url, tmp_path):
    shop = replica([10, 12, 9], photo_seed=9)
    weed = SeaweedFS(tmp_path / "weed", 0, "outage-key", "outage-secret")
    weed.start()
    try:
        s3 = crawler_s3_settings(weed)
        settings = crawl_settings(shop, s3, manifest_url, download_delay=0.15,
                                  concurrent_per_host=1)
        crawler.start_run(settings, "outage")
        outcome: dict = {}

        def crawl():
            try:
                outcome["stats"] = crawler.crawl_category(settings, CATEGORY, "outage")
            except CrawlError as exc:
                outcome["error"] = str(exc)

        worker = threading.Thread(target=crawl)
        worker.start()
        deadline = time.monotonic() + 60
        while len(stored_photos(manifest_url)) < 3:
            assert worker.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        weed.stop()
        worker.join(timeout=120)
        assert not worker.is_alive()
        assert "object store" in outcome.get("error", ""), outcome
        partial = len(stored_photos(manifest_url))

        weed.start()
        stats = crawler.crawl_category(settings, CATEGORY, "outage")
        crawler.finish_run(settings, "outage")
        assert stats["photos_stored"] > 0
        assert len(stored_photos(manifest_url)) > partial
        assert_matches_ground_truth(settings, shop.ground_truth())  # includes: no orphans
    finally:
        weed.stop()


def crawler_s3_settings(weed: SeaweedFS):
    from shoplens.config import Settings

    settings = Settings().with_overrides(s3_endpoint=weed.endpoint, s3_access_key=weed.access_key,
                                         s3_secret_key=weed.secret_key, s3_bucket="outage")
    ObjectStore(settings).ensure_bucket()
    return settings


def test_a_category_crawled_without_a_started_run_migrates_and_starts_it_itself(
        replica, s3_settings, fresh_database):
    # A category process skips the migration when its run exists (start_run did it); a crawl
    # run on its own, into an empty database, must still get its schema and run row.
    shop = replica([3, 2])
    settings = crawl_settings(shop, s3_settings, fresh_database)
    stats = crawler.crawl_category(settings, CATEGORY, "alone")
    assert stats["photos_stored"] == len(stored_photos(fresh_database)) > 0
    assert stats["requests"] > stats["photos_stored"]  # pages and photos, counted by the spider
    no_db = settings.with_overrides(
        manifest_url=f"postgresql+psycopg2://postgres@127.0.0.1:{free_port_block(1)}/none")
    with pytest.raises(CrawlError, match="manifest database"):
        crawler.crawl_category(no_db, CATEGORY, "alone")


def test_an_unreachable_manifest_or_store_is_a_clear_error(replica, s3_settings, manifest_url):
    shop = replica([3])
    settings = crawl_settings(shop, s3_settings, manifest_url)
    no_store = settings.with_overrides(s3_endpoint=f"127.0.0.1:{free_port_block(1)}")
    with pytest.raises(CrawlError, match="object store"):
        crawler.start_run(no_store, "x")
    no_db = settings.with_overrides(
        manifest_url=f"postgresql+psycopg2://postgres@127.0.0.1:{free_port_block(1)}/none")
    with pytest.raises(CrawlError, match="manifest database"):
        crawler.start_run(no_db, "x")


@pytest.mark.shared
def test_grocery_replica_best_20_of_6_categories_equals_ground_truth(s3_settings, manifest_url,
                                                                      tmp_path):
    from tests.conftest import shared_path
    from crawler.replica.listings import grocery_listing, write_listing

    root = shared_path("datasets", "grocery")
    listing = tmp_path / "grocery.csv"
    write_listing(grocery_listing(root, "train"), listing)
    with ReplicaShop(listing=listing, seed=1) as shop:
        settings = crawl_settings(shop, s3_settings, manifest_url, best_n=20,
                                  categories=[c["id"] for c in shop.ground_truth()["categories"]],
                                  reviews_per_page=50, concurrent_per_host=4,
                                  download_delay=0.0)
        assert len(settings.categories) == 6
        summary = crawl_run(settings, "grocery")
        truth = shop.ground_truth()
        assert_matches_ground_truth(settings, truth, sample=200)  # 2,640 photos: read back 200
        assert summary["failures"] == {}
        assert summary["photos_stored"] == len(truth["served"]) == 2640


def test_a_batch_of_photo_rows_is_one_idempotent_transaction(manifest_url):
    from crawler.manifest_writer import ManifestWriter, PhotoRow, ensure_run

    run_id = ensure_run(manifest_url, "batch", "http://shop.test", {})
    with engine_for(manifest_url).begin() as conn:
        conn.execute(sa.text("INSERT INTO categories (id, name, source_url, first_seen_run, "
                             "last_seen_run) VALUES ('1', 'c', 'u', :r, :r)"), {"r": run_id})
        conn.execute(sa.text("INSERT INTO products (id, category_id, name, source_url, "
                             "first_seen_run, last_seen_run) VALUES (5, '1', 'p', 'u', :r, :r)"),
                     {"r": run_id})
        for review_id in (1, 2, 3):
            conn.execute(sa.text("INSERT INTO reviews (id, product_id, source_url, first_seen_run)"
                                 " VALUES (:id, 5, 'u', :r)"), {"id": review_id, "r": run_id})
    sha = {name: hashlib.sha256(name.encode()).hexdigest() for name in "abcd"}

    def row(name: str, review_id: int) -> PhotoRow:
        return PhotoRow(sha256=sha[name], object_key=f"images/{name}.jpg", size_bytes=1, width=1,
                        height=1, format="jpeg", source_url=f"http://cdn.test/{review_id}",
                        review_id=review_id, product_id=5)

    writer = ManifestWriter(manifest_url, run_id)
    batch = [row("a", 1), row("a", 2), row("b", 3)]  # reviews 1 and 2 carry the same bytes
    assert writer.record_photos(batch) == [True, False, True]
    assert dict(query(manifest_url, "SELECT sha256, review_id FROM images")) == {
        sha["a"]: 1, sha["b"]: 3}  # the first review that brought the bytes
    assert dict(query(manifest_url, "SELECT review_id, sha256 FROM review_photos")) == {
        1: sha["a"], 2: sha["a"], 3: sha["b"]}
    assert writer.record_photos(batch) == [False, False, False]  # a rerun adds nothing

    # One bad row (its review is unknown) fails the whole batch: none of its rows is written.
    with pytest.raises(sa.exc.IntegrityError):
        writer.record_photos([row("c", 3), row("d", 999)])
    assert query(manifest_url, "SELECT count(*) FROM images")[0][0] == 2
    assert dict(query(manifest_url, "SELECT review_id, sha256 FROM review_photos"))[3] == sha["b"]


def test_with_no_delay_a_host_never_sees_more_requests_at_once_than_the_limit(
        replica, s3_settings, manifest_url):
    # Answers take 30 ms, so queued photos pile up in the CDN's download slot.
    shop = replica([14, 12, 10], latency=0.03, photo_seed=4)
    settings = crawl_settings(shop, s3_settings, manifest_url, download_delay=0.0,
                              concurrent_per_host=2, reviews_per_page=20)
    summary = crawl_run(settings, "no-delay")
    assert summary["photos_stored"] == 36
    hosts = shop.stats()["hosts"]
    assert hosts[urlsplit(shop.cdn_url).netloc]["requests"] >= 36
    assert all(h["max_in_flight"] <= 2 for h in hosts.values()), hosts


# --- the browser stays on allow-listed hosts ------------------------------------------------
def _offsite_probe() -> dict[str, int]:
    """Serve a shop page whose JS opens a popup, fetches, starts a worker and a service worker,
    opens a web socket and loads a script that redirects, all towards another host; and a page
    that redirects there. Returns the requests the other host received."""
    import asyncio
    import collections

    from aiohttp import web

    from crawler.browser import BrowserError, acquire_cookies

    hits: collections.Counter = collections.Counter()

    async def serve(app, host):
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    async def scenario():
        offsite = web.Application()

        async def record(request):
            hits[request.path] += 1
            return web.Response(text="offsite", content_type="text/html")

        offsite.router.add_get("/{tail:.*}", record)
        off_runner, off_port = await serve(offsite, "127.0.0.2")
        other = f"127.0.0.2:{off_port}"

        def js(text):
            return lambda request: web.Response(text=text, content_type="application/javascript")

        async def page(request):
            return web.Response(content_type="text/html", text=(
                "<html><head><script>document.cookie='waf=1; path=/';"
                f"window.open('http://{other}/popup'); fetch('http://{other}/fetch').catch(()=>0);"
                "new Worker('/worker.js'); navigator.serviceWorker &&"
                " navigator.serviceWorker.register('/sw.js').catch(()=>0);"
                f"try {{ new WebSocket('ws://{other}/ws'); }} catch (e) {{}}</script>"
                '<script src="/redirect.js"></script><script src="/slow.js"></script>'
                "</head><body>shop</body></html>"))

        async def redirect(request):
            raise web.HTTPFound(f"http://{other}{request.path}")

        async def slow(request):  # keeps the page loading while the popup starts
            await asyncio.sleep(1.5)
            return web.Response(text="1", content_type="application/javascript")

        shop = web.Application()
        shop.router.add_get("/page", page)
        shop.router.add_get("/start", redirect)
        shop.router.add_get("/redirect.js", redirect)
        shop.router.add_get("/slow.js", slow)
        shop.router.add_get("/worker.js", js(f"fetch('http://{other}/worker')"))
        shop.router.add_get("/sw.js", js(f"fetch('http://{other}/service-worker')"))
        shop_runner, port = await serve(shop, "127.0.0.1")
        options = dict(chromium_path="/usr/bin/chromium", user_agent="shoplens-test",
                       allowed_hosts={f"127.0.0.1:{port}"}, timeout_s=5.0, attempts=1)
        try:
            assert await acquire_cookies(f"http://127.0.0.1:{port}/page", **options) == {
                "waf": "1"}
            await asyncio.sleep(1.0)  # anything the popup or the workers would still send
            with pytest.raises(BrowserError):
                await acquire_cookies(f"http://127.0.0.1:{port}/start", **options)
        finally:
            await shop_runner.cleanup()
            await off_runner.cleanup()

    asyncio.run(scenario())
    return dict(hits)


def test_the_cookie_browser_starts_under_a_temporary_folder_too_deep_for_chromiums_socket(
        tmp_path, monkeypatch):
    """Chromium makes a Unix socket under $TMPDIR and exits at once when that path is too long
    (Playwright says only "browser has been closed"): the crawler's browser still gets the
    cookie when the worker's TMPDIR is deep."""
    import asyncio

    from aiohttp import web

    from crawler.browser import CHROMIUM_TMPDIR_MAX, acquire_cookies

    deep = tmp_path / ("d" * (CHROMIUM_TMPDIR_MAX + 10))
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))

    async def scenario():
        async def page(request):
            return web.Response(content_type="text/html", text=(
                "<html><head><script>document.cookie='waf=1; path=/';</script></head></html>"))

        app = web.Application()
        app.router.add_get("/page", page)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            return await acquire_cookies(
                f"http://127.0.0.1:{port}/page", chromium_path="/usr/bin/chromium",
                user_agent="shoplens-test", allowed_hosts={f"127.0.0.1:{port}"}, timeout_s=5.0,
                attempts=1)
        finally:
            await runner.cleanup()

    assert asyncio.run(scenario()) == {"waf": "1"}


def test_the_browser_never_reaches_another_host_by_popup_worker_socket_or_redirect():
    """The cookie browser's allow-list covers the whole context: popups, workers, service
    workers, web sockets, and redirects of the page and of its scripts."""
    assert _offsite_probe() == {}


# --- hostile shop data ----------------------------------------------------------------------
# What the crawler records for each kind of --faults hostile-data (crawler/replica/hostile.py):
# (stage, reason) of its failure row, or None where the answer is cleaned or resolved and stored.
HOSTILE_OUTCOME = {
    "product_id_overflow": ("product", "out_of_range"),
    "review_count_overflow": ("product", "out_of_range"),
    "queries_not_objects": ("product", "missing_field"),
    "deep_nesting": ("product", "invalid_json"),
    "infinity_id": ("product", "invalid_json"),
    "review_id_1e400": ("reviews", "unexpected_shape"),
    "review_id_bool": ("reviews", "unexpected_shape"),
    "review_id_fraction": ("reviews", "unexpected_shape"),
    "review_id_overflow": ("reviews", "out_of_range"),
    "duplicate_review_id": ("reviews", "duplicate_review_id"),
    "reviews_not_a_list": ("reviews", "missing_field"),
    "photo_relative": ("image", "http_404"),  # resolved against the shop, which has no such file
    "photo_javascript": ("image", "bad_photo_url"),
    "photo_bad_port": ("image", "bad_photo_url"),
    "nul_and_surrogate": None,
    "photo_protocol_relative": None,
}


def _failures_of_run(url: str, run_key: str) -> set[tuple]:
    return set(query(url, "SELECT f.product_id, f.stage, f.reason FROM crawl_failures f JOIN "
                          "crawl_runs c ON c.id = f.run_id WHERE c.run_key = :k", k=run_key))


def test_hostile_shop_data_is_recorded_per_product_and_never_stops_the_crawl(
        replica, s3_settings, manifest_url):
    """Every kind of malformed answer costs only its own product (or review, or photo), with
    a failure row saying why; every other product is crawled whole; the next night asks again
    and records the same, and stored bad photo addresses are re-checked, never raised."""
    from crawler.replica.hostile import KINDS

    shop = replica([3] * 20, faults="hostile-data=0.8", photo_seed=21)
    assert set(HOSTILE_OUTCOME) == set(KINDS)
    settings = crawl_settings(shop, s3_settings, manifest_url, retry_times=1, best_n=20)

    crawl_run(settings, "hostile-1")
    truth = shop.ground_truth()
    hostile = {h["product_id"]: h for h in truth["hostile"]}
    assert {h["kind"] for h in hostile.values()} == set(KINDS)  # every kind was served
    product_ids = expected_products(truth, 20)[CATEGORY]
    assert query(manifest_url, "SELECT status FROM crawl_runs WHERE run_key = 'hostile-1'") == [
        ("success",)]

    # Every product whose answers were good, or cleaned/resolved, is crawled whole.
    whole = [p for p in product_ids
             if p not in hostile or HOSTILE_OUTCOME[hostile[p]["kind"]] is None]
    good_photos = photo_reviews(truth, whole)
    stored = stored_photos(manifest_url)
    assert set(good_photos) <= set(stored)
    reviews = dict(query(manifest_url, "SELECT id, comment FROM reviews"))
    for review in truth["reviews"]:
        if review["product_id"] in whole:
            assert review["id"] in reviews
    cleaned = next(h for h in hostile.values() if h["kind"] == "nul_and_surrogate")
    assert reviews[cleaned["review_id"]] == "beforeafter\ufffdend"  # NUL gone, surrogate replaced

    # Every hostile answer has its failure row with its reason; nothing was unexpected.
    failures = _failures_of_run(manifest_url, "hostile-1")
    expected = {(pid, *HOSTILE_OUTCOME[h["kind"]]) for pid, h in hostile.items()
                if HOSTILE_OUTCOME[h["kind"]] is not None}
    assert expected <= failures
    assert {f for f in failures if f[0] not in hostile} == set()
    assert not any(reason == "spider_exception" for _, _, reason in failures)

    # Addresses an older parser stored unchecked: one protocol-relative, one javascript:.
    good_product = next(p for p in product_ids if p not in hostile)
    relative_id, script_id = sorted(photo_reviews(truth, [good_product]))[:2]
    cdn = urlsplit(shop.cdn_url).netloc
    with engine_for(manifest_url).begin() as conn:
        conn.execute(sa.text("DELETE FROM review_photos WHERE review_id IN (:a, :b)"),
                     {"a": relative_id, "b": script_id})
        conn.execute(sa.text("UPDATE reviews SET photo_url = :u WHERE id = :i"),
                     {"u": f"//{cdn}{urlsplit(good_photos[relative_id]['photo_url']).path}",
                      "i": relative_id})
        conn.execute(sa.text("UPDATE reviews SET photo_url = 'javascript:alert(1)' WHERE id = :i"),
                     {"i": script_id})

    crawl_run(settings, "hostile-2")
    assert query(manifest_url, "SELECT status FROM crawl_runs WHERE run_key = 'hostile-2'") == [
        ("success",)]
    again = _failures_of_run(manifest_url, "hostile-2")
    assert expected <= again  # asked again, recorded again
    assert (good_product, "image", "bad_photo_url") in again
    assert not any(reason == "spider_exception" for _, _, reason in again)
    assert relative_id in stored_photos(manifest_url)  # healed through the resolved address
    assert set(good_photos) - {script_id} <= set(stored_photos(manifest_url))


def test_a_category_that_yields_no_product_fails_the_crawl_task(replica, s3_settings,
                                                                 manifest_url):
    """An empty or lost ranking is a lost category: crawl_category raises (the DAG task
    fails) instead of returning stats of 0 products, and its stats still reach the run row."""
    shop = replica([3, 3])
    settings = crawl_settings(shop, s3_settings, manifest_url, categories=["99990000"])
    crawler.start_run(settings, "lost")
    with pytest.raises(CrawlError, match="no product crawled"):
        crawler.crawl_category(settings, "99990000", "lost")
    (stats,) = query(manifest_url, "SELECT stats->'categories'->'99990000' FROM crawl_runs "
                                   "WHERE run_key = 'lost'")[0]
    assert stats["products"] == 0 and "no product crawled" in stats["error"]


def test_a_shop_whose_pages_set_no_waf_cookie_is_crawled_without_a_browser(
        replica, s3_settings, manifest_url, tmp_path, monkeypatch):
    """The cookie is fetched when the shop refuses a call, not required up front: with the WAF
    off, the night is complete and no browser was started."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # no WAF cookie cached by an earlier test
    shop = replica([4, 5], waf=False)
    settings = crawl_settings(shop, s3_settings, manifest_url)
    crawler.start_run(settings, "no-waf")
    stats = crawler.crawl_category(settings, CATEGORY, "no-waf")
    crawler.finish_run(settings, "no-waf")
    assert stats["waf_cookie_acquired"] == 0 and stats["waf_cookie_reused"] == 0
    assert stats["failures"] == {} and stats["products"] == 2
    assert_matches_ground_truth(settings, shop.ground_truth())


# Loaded by the crawl's child process (PYTHONPATH): the manifest refuses one review's photo row
# with an exception nobody foresaw, as a bug or an unforeseen value would.
_REFUSE_ONE_PHOTO_ROW = '''
import os

from crawler import manifest_writer

_refused = int(os.environ["SHOPLENS_TEST_REFUSED_REVIEW"])
_record_photos = manifest_writer.ManifestWriter.record_photos


def record_photos(self, photos):
    if any(p.review_id == _refused for p in photos):
        raise RuntimeError("injected: this photo's row cannot be written")
    return _record_photos(self, photos)


manifest_writer.ManifestWriter.record_photos = record_photos
'''


def test_an_unexpected_exception_storing_one_photo_is_recorded_and_fails_the_category(
        replica, s3_settings, manifest_url, tmp_path, monkeypatch):
    """An exception the item pipeline did not foresee costs only its photo: every other photo
    (those batched with it included) is stored, a ``pipeline_exception`` row names the photo,
    and the category crawl fails instead of ending as if nothing happened."""
    shop = replica([6, 5], photo_seed=13)
    truth = shop.ground_truth()
    good = photo_reviews(truth, expected_products(truth, 20)[CATEGORY])
    refused = sorted(good)[len(good) // 2]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_REFUSE_ONE_PHOTO_ROW)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("SHOPLENS_TEST_REFUSED_REVIEW", str(refused))
    settings = crawl_settings(shop, s3_settings, manifest_url)
    crawler.start_run(settings, "refused")

    with pytest.raises(CrawlError, match="unexpected exception.*pipeline_exception"):
        crawler.crawl_category(settings, CATEGORY, "refused")

    assert set(stored_photos(manifest_url)) == set(good) - {refused}
    assert query(manifest_url, "SELECT review_id, stage, reason, detail FROM crawl_failures") == [
        (refused, "image", "pipeline_exception",
         "RuntimeError: injected: this photo's row cannot be written")]
    (stats,) = query(manifest_url, "SELECT stats->'categories'->:c FROM crawl_runs WHERE "
                                   "run_key = 'refused'", c=CATEGORY)[0]
    assert stats["pipeline_exceptions"] == 1 and "pipeline_exception" in stats["error"]


def test_a_waf_challenge_page_served_with_status_200_gets_the_cookie_and_the_crawl_completes(
        replica, s3_settings, manifest_url, tmp_path, monkeypatch):
    """A WAF that challenges instead of blocking answers a JSON call without its cookie with
    the JavaScript challenge page and status 200: the crawler takes it for the refusal it is,
    fetches the cookie and retries, and the night is complete (no call parsed as bad JSON)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # no WAF cookie cached by an earlier test
    shop = replica([4, 5], waf_challenge_page=True)
    settings = crawl_settings(shop, s3_settings, manifest_url)
    crawler.start_run(settings, "challenge")
    stats = crawler.crawl_category(settings, CATEGORY, "challenge")
    crawler.finish_run(settings, "challenge")
    served = shop.stats()
    assert served["blocked"].get("missing", 0) >= 1  # the shop did challenge the first call
    assert served["status"].get("403", 0) == 0  # ... with its 200 page, never a 403
    assert stats["waf_cookie_acquired"] >= 1
    assert stats["failures"] == {} and stats["products"] == 2
    assert_matches_ground_truth(settings, shop.ground_truth())


def test_a_waf_challenge_that_stays_after_the_cookie_is_renewed_is_a_waf_challenge_failure(
        replica, s3_settings, manifest_url, tmp_path, monkeypatch):
    """When even a fresh cookie only brings the challenge page back (here the shop's WAF
    accepts no cookie the page's script computes, as after a change of its challenge), the
    call is recorded as ``waf_challenge``, not retried as bad JSON, and the lost category fails
    the crawl task."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    shop = replica([2], waf_challenge_page=True)
    monkeypatch.setattr(shop.runtime.waf, "check", lambda token: "invalid")
    settings = crawl_settings(shop, s3_settings, manifest_url)
    crawler.start_run(settings, "challenged")
    with pytest.raises(CrawlError, match="waf_challenge x1"):
        crawler.crawl_category(settings, CATEGORY, "challenged")
    assert _failures_of_run(manifest_url, "challenged") == {(None, "ranking", "waf_challenge")}
