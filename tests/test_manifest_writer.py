"""The crawl's manifest writes of rankings and review pages: upserts keyed on the shop's ids, so a
night that sees a product or review again updates it in place and keeps when it was first seen.

Needs the PostgreSQL manifest (the ``manifest_url`` fixture of tests/conftest.py).
"""
from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from crawler import site
from crawler.manifest_writer import ManifestWriter, ensure_run
from shoplens.manifest import engine_for


def rows(url: str, sql: str) -> list[tuple]:
    with engine_for(url).connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql))]


def ranked(pid: int, rank: int, name: str, reviews: int) -> site.RankedProduct:
    return site.RankedProduct(id=pid, rank=rank, name=name, brand="b", price=1000,
                              review_count=reviews, rating=4.5)


def review(rid: int, comment: str) -> site.Review:
    return site.Review(id=rid, created_date=dt.date(2026, 1, rid % 28 + 1), stars=5.0,
                       comment=comment, writer_nickname="n", photo_url=f"http://cdn.test/{rid}.jpg")


def two_nights(manifest_url: str) -> tuple[ManifestWriter, ManifestWriter]:
    runs = [ensure_run(manifest_url, key, "http://shop.test", {}) for key in ("n1", "n2")]
    return ManifestWriter(manifest_url, runs[0]), ManifestWriter(manifest_url, runs[1])


def test_a_ranking_seen_again_updates_its_products_and_adds_one_rank_row_per_night(manifest_url):
    first, second = two_nights(manifest_url)
    url_for = lambda pid: f"http://shop.test/p/{pid}"  # noqa: E731
    first.record_ranking("1", "Chairs", "http://shop.test/r/1",
                         [ranked(10, 1, "chair", 3), ranked(11, 2, "stool", 5)], url_for)
    second.record_ranking("1", None, "http://shop.test/r/1b",
                          [ranked(11, 1, "stool v2", 6), ranked(12, 2, "bench", 1)], url_for)

    assert rows(manifest_url, "SELECT id, name, source_url, first_seen_run, last_seen_run "
                              "FROM categories") == [
        ("1", "Chairs", "http://shop.test/r/1b", first.run_id, second.run_id)]  # name kept
    assert rows(manifest_url, "SELECT id, name, rank, review_count, first_seen_run, "
                              "last_seen_run FROM products ORDER BY id") == [
        (10, "chair", 1, 3, first.run_id, first.run_id),
        (11, "stool v2", 1, 6, first.run_id, second.run_id),
        (12, "bench", 2, 1, second.run_id, second.run_id)]
    assert rows(manifest_url, "SELECT run_id, product_id, rank FROM product_ranks "
                              "ORDER BY run_id, product_id") == [
        (first.run_id, 10, 1), (first.run_id, 11, 2),
        (second.run_id, 11, 1), (second.run_id, 12, 2)]


def test_a_review_page_seen_again_counts_only_its_new_reviews_and_updates_the_rest(manifest_url):
    first, second = two_nights(manifest_url)
    first.record_ranking("1", "Chairs", "http://shop.test/r/1", [ranked(10, 1, "chair", 3)],
                         lambda pid: f"http://shop.test/p/{pid}")
    assert first.record_reviews(10, [review(1, "good"), review(2, "fine")], "http://p1") == 2
    assert second.record_reviews(10, [review(2, "fine, edited"), review(3, "new")],
                                 "http://p1b") == 1
    assert first.record_reviews(10, [], "http://p1") == 0

    assert rows(manifest_url, "SELECT id, comment, source_url, first_seen_run FROM reviews "
                              "ORDER BY id") == [
        (1, "good", "http://p1", first.run_id),
        (2, "fine, edited", "http://p1", first.run_id),  # the address it was first found at
        (3, "new", "http://p1b", second.run_id)]
