"""The crawl economics benchmark (benchmarks/crawl_economics.py) computes what it reports rightly:
requests by kind as the shop counted them, the incremental/full and crawler/asyncio ratios, CPU
per process group and the medians over rounds. Numbers, not timings: nothing here is timed."""
from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from benchmark_modules import load_benchmark
from test_crawl import CATEGORY, make_photo_dir

economics = load_benchmark("crawl_economics")


def test_requests_are_counted_by_kind_from_two_snapshots_of_the_shops_counter():
    """pages = ranking and product pages; JSON = ranking data, review pages, star counts;
    photos = review photos; catalogue images = the products' own images; other = the rest
    (robots.txt, static files); total = all of it."""
    before = {"robots": 1, "ranks_page": 2, "image": 10}
    after = {"robots": 2, "ranks_page": 3, "ranks_data": 1, "product_page": 4, "reviews": 5,
             "star_counts": 2, "image": 40, "catalogue_image": 2, "static": 3}
    assert economics.requests_by_kind(before, after) == {
        "pages": 1 + 4, "json": 1 + 5 + 2, "photos": 30, "catalogue_images": 2, "other": 1 + 3,
        "total": 49}


def test_every_request_kind_counted_is_a_route_the_replica_names():
    """A renamed replica route would silently move its requests to "other"."""
    from crawler.replica.app import build_cdn_app, build_shop_app

    kinds = {route.name.split(":")[0]  # as the replica's request counter names them
             for app in (build_shop_app(None, "shop"), build_cdn_app(None, "cdn"))
             for route in app.router.routes() if route.name}
    counted = {route for routes in economics.REQUEST_KINDS.values() for route in routes}
    assert counted <= kinds
    assert kinds - counted == {"robots", "static", "disallowed", "admin"}


def test_incremental_night_ratios_are_incremental_over_full_per_kind_and_for_time():
    full = {"night_s": 100.0,
            "requests_by_kind": {"pages": 90, "json": 100, "photos": 2600, "other": 10,
                                 "total": 2800}}
    incremental = {"night_s": 8.0,
                   "requests_by_kind": {"pages": 90, "json": 95, "photos": 26, "other": 9,
                                        "total": 220}}
    ratios = economics.incremental_vs_full(full, incremental)
    assert ratios["requests"] == {"pages": 1.0, "json": 0.95, "photos": 0.01, "other": 0.9,
                                  "total": round(220 / 2800, 4)}
    assert ratios["time"] == 0.08
    assert ratios["own_cpu"] is None  # no CPU measured
    full["cpu"] = {"cpu_s": {"crawl_process": 20.0, "object_store": 5.0, "database": 2.0,
                             "shop": 3.0, "other": 500.0}}
    incremental["cpu"] = {"cpu_s": {"crawl_process": 2.5, "object_store": 0.2, "database": 0.2,
                                    "shop": 0.1, "other": 100.0}}
    assert economics.incremental_vs_full(full, incremental)["own_cpu"] == 0.1  # 3 of 30 s
    assert ratios["time_target_met"] and not ratios["requests_target_met"]  # 7.9 % > 5 %


def test_a_kind_the_full_crawl_never_asked_for_has_no_ratio():
    full = {"night_s": 10.0, "requests_by_kind": {"pages": 0, "total": 5}}
    incremental = {"night_s": 1.0, "requests_by_kind": {"pages": 0, "total": 1}}
    assert economics.incremental_vs_full(full, incremental)["requests"] == {
        "pages": None, "total": 0.2}


def test_crawler_against_asyncio_is_photos_per_second_over_photos_per_second():
    crawled = {"image_phase_photos_per_s": 120.0, "end_to_end_photos_per_s": 60.0}
    assert economics.crawler_vs_asyncio(crawled, {"photos_per_s": 150.0}) == {
        "image_phase": 0.8, "end_to_end": 0.4}


def test_cpu_is_grouped_by_process_and_divided_by_the_photos_stored():
    """The crawl process is the crawl child processes plus the benchmark's own process (where
    asyncio runs); PostgreSQL is the database, SeaweedFS the object store, the replica the shop."""
    spent = {"wall_s": 4.0, "machine": 6.0, "children": 2.0, "this_process": 0.5,
             "object_store": 1.0, "postgres": 0.25, "replica": 0.25, "other": 2.0}
    usage = economics.cpu_by_process_group(spent, photos=500)
    assert usage["cpu_ms_per_stored_photo"] == {
        "crawl_process": 5.0, "object_store": 2.0, "database": 0.5, "shop": 0.5, "other": 4.0,
        "machine": 12.0}
    assert usage["cpu_s"]["crawl_process"] == 2.5 and usage["cores_busy"] == 1.5
    nothing_stored = economics.cpu_by_process_group(spent, photos=0)
    assert set(nothing_stored["cpu_ms_per_stored_photo"].values()) == {None}
    assert nothing_stored["cpu_s"] == usage["cpu_s"]


def test_marginal_cpu_per_photo_is_the_nights_difference_over_their_difference_in_photos():
    """Both nights pay the same fixed cost (process starts, pages), so it cancels out."""
    full = {"photos": 1026, "cpu": {"cpu_s": {"crawl_process": 14.0, "database": 1.0}}}
    incremental = {"photos": 26, "cpu": {"cpu_s": {"crawl_process": 10.0, "database": 0.5}}}
    assert economics.marginal_cpu_ms_per_photo(full, incremental) == {
        "crawl_process": 4.0, "database": 0.5}
    assert economics.marginal_cpu_ms_per_photo(incremental, incremental) == {
        "crawl_process": None, "database": None}


def test_medians_are_taken_per_nested_value_over_the_rounds_that_have_it():
    rounds = [{"a": {"b": 1.0, "c": None}}, {"a": {"b": 3.0, "c": 2.0}}, {"a": {"b": 2.0}}]
    assert economics.medians(rounds, [("a", "b"), ("a", "c"), ("a", "d")]) == {
        "a": {"b": 2.0, "c": 2.0, "d": None}}


@pytest.fixture
def shop_with_new_reviews_held_back(tmp_path):
    from crawler.replica import ReplicaShop

    shop = ReplicaShop(photos=make_photo_dir(tmp_path / "photos", [6, 4, 5]), seed=7,
                       hold_back=3).start()
    yield shop
    shop.stop()


def test_a_tiny_full_and_incremental_night_are_counted_as_the_shop_and_the_crawler_saw_them(
        shop_with_new_reviews_held_back, s3_settings, manifest_url):
    """A real crawl of a 15-photo shop with 3 photo reviews held back, then released: the photos
    the shop served are the photos stored each night, the shop's total is the crawler's own
    request count, and the incremental night asks again only for what a night always asks
    (ranking, product pages, first review pages) plus the new photos."""
    shop = shop_with_new_reviews_held_back
    settings = s3_settings.with_overrides(
        manifest_url=manifest_url, shop_base_url=shop.base_url,
        allowed_hosts=[urlsplit(shop.cdn_url).netloc], categories=[CATEGORY], best_n=20,
        download_delay=0.0, autothrottle=False, reviews_per_page=5, concurrent_per_host=3)

    def shop_requests() -> dict:
        return shop.stats()["requests"]

    full = economics.measured_night(settings, "night-1", 1, shop_requests, meter=None)
    incremental_photos_before = shop_requests().get("image", 0)
    assert len(shop.release(3)) == 3
    incremental = economics.measured_night(settings, "night-2", 1, shop_requests, meter=None)

    products = 3
    for night, photos in ((full, 12), (incremental, 3)):
        counted = night["requests_by_kind"]
        assert night["photos"] == counted["photos"] == photos
        assert counted["total"] == sum(v for k, v in counted.items() if k != "total")
        # The shop sees at least what the crawler sent (and the browser's WAF visit, if any).
        assert counted["total"] >= night["requests"]
    assert shop_requests()["image"] == incremental_photos_before + 3
    # The incremental night asks again for the ranking and every product page, and for one
    # review page per product: each walk stops at a page holding reviews known last night.
    assert incremental["requests_by_kind"]["pages"] == 1 + products
    assert incremental["requests_by_kind"]["json"] == 1 + products
    assert full["requests_by_kind"]["json"] > incremental["requests_by_kind"]["json"]

    ratios = economics.incremental_vs_full(full, incremental)
    assert ratios["requests"]["photos"] == 0.25
    assert ratios["requests"]["total"] == round(
        incremental["requests_by_kind"]["total"] / full["requests_by_kind"]["total"], 4)
    assert ratios["time"] == round(incremental["night_s"] / full["night_s"], 4)
