"""The crawl stage's pure parts: the shop adapter, photo validation, settings hand-over."""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from crawler.images import ImageRejected, validate_image
from crawler.manifest_writer import ProductState
from crawler.middlewares import retry_after_seconds
from crawler.run import settings_env
from crawler.site import ParseError, ShopSite
from crawler.scrapy_settings import scrapy_settings
from shoplens.config import ConfigError, Settings

REPO_ROOT = Path(__file__).resolve().parents[1]

SITE = ShopSite("http://shop.test", "w=1280&h=1280")
LIMITS = dict(max_pixels=40_000_000, max_bytes=20_000_000)


def _jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries almost no pixel data (a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# --- addresses ------------------------------------------------------------------------------
def test_addresses_follow_the_current_store_generation():
    assert SITE.ranks_page_url("10120000") == "http://shop.test/ranks?type=best&category_id=10120000"
    assert (SITE.ranks_data_url("B1", "10120000")
            == "http://shop.test/_next/data/B1/ko-KR/ranks.json?type=best&category_id=10120000")
    assert SITE.product_page_url(123) == "http://shop.test/goods/123"
    assert (SITE.reviews_url(123, 2, 20)
            == "http://shop.test/api/goods/reviews?productionId=123&page=2&per=20&order=recent")


def test_a_photo_is_always_requested_at_the_one_fixed_size():
    cdn = "http://cdn.test/apne2/any/uploads/cards/snapshots/123456789012345678.jpg"
    assert SITE.image_url(cdn + "?w=360&h=360&c=c") == cdn + "?w=1280&h=1280"
    assert SITE.image_url(cdn) == cdn + "?w=1280&h=1280"


def test_only_json_endpoints_of_the_shop_are_waf_guarded():
    assert SITE.is_waf_guarded("http://shop.test/api/goods/reviews?productionId=1")
    assert SITE.is_waf_guarded("http://shop.test/_next/data/B/ko-KR/ranks.json")
    assert not SITE.is_waf_guarded("http://shop.test/goods/1")
    assert not SITE.is_waf_guarded("http://cdn.test/api/x")


# --- parsing --------------------------------------------------------------------------------
def _next_page(data: dict) -> str:
    return (f'<html><script id="__NEXT_DATA__" type="application/json">{json.dumps(data)}'
            f'</script></html>')


def test_build_id_comes_from_next_data_or_the_build_manifest_script():
    assert SITE.parse_build_id(_next_page({"buildId": "abc123", "page": "/ranks"})) == "abc123"
    assert SITE.parse_build_id('<script src="/_next/static/XyZ/_buildManifest.js"></script>') == "XyZ"
    with pytest.raises(ParseError) as err:
        SITE.parse_build_id("<html>nothing</html>")
    assert err.value.reason == "no_build_id"


@pytest.mark.parametrize("build_id", ["../../../api/admin?x=", "a/b", "a b", "x" * 200, 7, ""])
def test_a_build_id_that_is_not_a_plain_token_never_reaches_a_url(build_id):
    with pytest.raises(ParseError) as err:
        SITE.parse_build_id(_next_page({"buildId": build_id}))
    assert err.value.reason in ("bad_build_id", "no_build_id")
    if isinstance(build_id, str):
        with pytest.raises(ParseError):
            SITE.ranks_data_url(build_id, "10120000")


def test_repeated_unclosed_next_data_scripts_parse_in_linear_time():
    """The old regex backtracked quadratically (8-9 s at 216 KB); parsel reads 2 MB at once.

    No timing assertion: the work is bounded by a parse that either finishes or raises.
    """
    html = '<script id="__NEXT_DATA__">{' * 80_000
    with pytest.raises(ParseError) as err:
        SITE.parse_product_page(html)
    assert err.value.reason in ("invalid_json", "invalid_html")
    with pytest.raises(ParseError):  # the rest of the page is script text, as in a browser
        SITE.parse_build_id(html + '<script src="/_next/static/B1/_buildManifest.js"></script>')


def test_ranking_keeps_rank_order_and_category_meta():
    doc = {"pageProps": {"dehydratedState": {"queries": [
        {"state": {"data": {"category": {"id": "10120000", "title": "침대"}}}},
        {"state": {"data": {"products": [
            {"id": 7, "name": "A", "brandName": "b", "reviewCount": 9, "reviewAvg": 4.5,
             "sellingPrice": 1000},
            {"id": 3, "name": "B", "brandName": None, "reviewCount": 2}]}}}]}}}
    ranking = SITE.parse_ranking(json.dumps(doc).encode())
    assert ranking.category.id == "10120000" and ranking.category.name == "침대"
    assert [(p.id, p.rank) for p in ranking.products] == [(7, 1), (3, 2)]
    assert ranking.products[0].price == 1000 and ranking.products[1].rating is None


@pytest.mark.parametrize("body, reason", [
    (b"<html>Access Denied</html>", "invalid_json"),
    (b'{"pageProps": {}}', "missing_field"),
    (b'{"pageProps": {"dehydratedState": {"queries": {}}}}', "unexpected_shape"),
    (b'{"pageProps": {"dehydratedState": {"queries": [{"state": "x"}]}}}', "missing_field"),
    (b'{"pageProps": {"dehydratedState": {"queries": [null, {"state": null}]}}}', "missing_field"),
    (b'{"pageProps": {"dehydratedState": {"queries": [{"state": {"data": {"products": '
     b'[{"id": Infinity, "name": "x"}]}}}]}}}', "invalid_json"),
    (b'[' * 100_000 + b']' * 100_000, "invalid_json"),  # RecursionError inside json
])
def test_malformed_ranking_is_a_parse_error_with_a_reason(body, reason):
    with pytest.raises(ParseError) as err:
        SITE.parse_ranking(body)
    assert err.value.reason == reason


def _ranking(*products) -> bytes:
    return json.dumps({"pageProps": {"dehydratedState": {"queries": [
        {"state": {"data": {"products": list(products)}}}]}}}).encode()


@pytest.mark.parametrize("raw_id, reason", [
    (None, "missing_field"), (True, "unexpected_shape"), (1.9, "unexpected_shape"),
    ("12a", "unexpected_shape"), (2 ** 70, "out_of_range"), (0, "out_of_range"),
    ("9" * 5000, "out_of_range"), ({"x": 1}, "unexpected_shape"),
])
def test_a_product_with_an_unusable_id_is_set_aside_with_its_reason(raw_id, reason):
    """bool/float ids never become 1, ids beyond BIGINT are refused; the other products stay."""
    ranking = SITE.parse_ranking(_ranking({"id": raw_id, "name": "bad"}, {"id": 8, "name": "ok"}))
    assert [(p.id, p.rank) for p in ranking.products] == [(8, 2)]
    assert [(r.position, r.reason) for r in ranking.rejected] == [(1, reason)]


def test_a_1e400_id_and_a_3e9_review_count_are_refused_not_overflowed():
    body = (b'{"pageProps": {"dehydratedState": {"queries": [{"state": {"data": {"products": ['
            b'{"id": 1e400, "name": "a"}, {"id": 5, "name": "b", "reviewCount": 3000000000},'
            b'{"id": 6, "name": "c", "reviewAvg": 1e400}, {"id": 6, "name": "dup"},'
            b'{"id": 7, "name": "d", "reviewCount": 4}, {"id": 7, "name": "again"}]}}}]}}}')
    ranking = SITE.parse_ranking(body)
    assert [(p.id, p.name) for p in ranking.products] == [(6, "dup"), (7, "d")]
    assert [r.reason for r in ranking.rejected] == [
        "unexpected_shape", "out_of_range", "out_of_range", "duplicate_id"]
    assert SITE.parse_ranking(_ranking({"id": 3, "name": "x", "reviewCount": 2 ** 31 - 1})
                              ).products[0].review_count == 2 ** 31 - 1


def test_a_non_dict_query_or_state_is_a_parse_error_not_an_attribute_error():
    for queries in ([{"state": "x"}], [None], [{"state": {"data": None}}], ["x", 1]):
        html = _next_page({"props": {"pageProps": {"dehydratedState": {"queries": queries}}}})
        with pytest.raises(ParseError) as err:
            SITE.parse_product_page(html)
        assert err.value.reason == "missing_field"


def test_a_huge_or_fractional_product_page_value_is_a_parse_error():
    for production, reason in (({"id": 2 ** 70, "name": "x"}, "out_of_range"),
                               ({"id": 5, "name": "x", "reviewCount": 3e9}, "unexpected_shape"),
                               ({"id": 5, "name": "x", "reviewCount": 3_000_000_000},
                                "out_of_range"),
                               ({"id": 5, "name": {"ko": "x"}}, "unexpected_shape")):
        html = _next_page({"props": {"pageProps": {"dehydratedState": {"queries": [
            {"state": {"data": {"production": production}}}]}}}})
        with pytest.raises(ParseError) as err:
            SITE.parse_product_page(html)
        assert err.value.reason == reason


def test_product_page_is_read_from_next_data():
    html = _next_page({"props": {"pageProps": {"dehydratedState": {"queries": [
        {"state": {"data": {"production": {"id": 5, "name": "침대 A", "brandName": "B",
                                           "sellingPrice": 10, "reviewCount": 3,
                                           "reviewAvg": 4.0},
                            "categories": [{"id": "10120000", "title": "침대"}]}}},
        {"state": {"data": {"review": {"reviews": [], "totalCount": 3}}}}]}}}})
    page = SITE.parse_product_page(html)
    assert (page.id, page.name, page.review_total) == (5, "침대 A", 3)
    assert page.categories[0].id == "10120000"
    with pytest.raises(ParseError):
        SITE.parse_product_page("<html><body>404</body></html>")


def test_reviews_page_keeps_the_bare_photo_address_and_photo_less_reviews():
    doc = {"totalCount": 2, "reviews": [
        {"id": 11, "createdAt": "2026.08.31", "writerNickname": "w",
         "review": {"starAvg": 5, "comment": "좋아요"},
         "card": {"imageUrl": "http://cdn.test/a/1.jpg", "imgUrl": "http://cdn.test/a/1.jpg?w=360"}},
        {"id": 10, "createdAt": "2026.08.30", "review": {"starAvg": 3}, "card": None}]}
    page = SITE.parse_reviews(json.dumps(doc))
    assert page.total_count == 2
    first, second = page.reviews
    assert first.photo_url == "http://cdn.test/a/1.jpg" and str(first.created_date) == "2026-08-31"
    assert second.photo_url is None and second.stars == 3.0


PAGE_URL = "http://shop.test/api/goods/reviews?productionId=1&page=1"


def _reviews(*reviews, total=None) -> str:
    return json.dumps({"totalCount": total, "reviews": list(reviews)})


@pytest.mark.parametrize("address, resolved", [
    ("//cdn.test/a/1.jpg?w=360", "http://cdn.test/a/1.jpg"),  # protocol-relative
    ("/img/a.jpg", "http://shop.test/img/a.jpg"),  # relative to the page
    (" https://cdn.test:8443/b.jpg ", "https://cdn.test:8443/b.jpg"),
])
def test_photo_addresses_are_resolved_against_the_page(address, resolved):
    page = SITE.parse_reviews(_reviews({"id": 1, "card": {"imageUrl": address}}), PAGE_URL)
    assert page.reviews[0].photo_url == resolved and page.reviews[0].photo_error is None


@pytest.mark.parametrize("address", [
    "javascript:alert(1)", "http://cdn.test:99999/a.jpg", "http://cdn.test:x/a.jpg",
    "file:///etc/passwd", "ftp://cdn.test/a.jpg", "data:image/png;base64,AAAA", "http://[::1/a",
    "http://user:pw@cdn.test/a.jpg", "http://cdn.test/a\x00.jpg", 42, ["x"],
])
def test_a_bad_photo_address_keeps_the_review_and_says_why(address):
    """The review is stored; its photo is a ``bad_photo_url`` failure, never an exception."""
    page = SITE.parse_reviews(_reviews({"id": 1, "card": {"imageUrl": address}},
                                       {"id": 2, "card": {"imageUrl": "//cdn.test/ok.jpg"}}),
                              PAGE_URL)
    first, second = page.reviews
    assert first.photo_url is None and first.photo_error.reason == "bad_photo_url"
    assert second.photo_url == "http://cdn.test/ok.jpg"


def test_a_stored_bad_photo_address_is_a_parse_error_on_later_nights():
    """Healing asks for photos stored by older nights: their addresses are checked again."""
    assert SITE.image_url("//cdn.test/a.jpg") == "http://cdn.test/a.jpg?w=1280&h=1280"
    for stored in ("javascript:alert(1)", "http://cdn.test:99999/a.jpg"):
        with pytest.raises(ParseError) as err:
            SITE.image_url(stored)
        assert err.value.reason == "bad_photo_url"


def test_review_ids_that_are_not_plain_integers_or_repeat_are_set_aside():
    page = SITE.parse_reviews(_reviews({"id": True}, {"id": 1.9}, {"id": 2 ** 70}, {"id": 5},
                                       {"id": 5}, {"id": 6}), PAGE_URL)
    assert [r.id for r in page.reviews] == [5, 6]
    assert [(r.position, r.reason) for r in page.rejected] == [
        (1, "unexpected_shape"), (2, "unexpected_shape"), (3, "out_of_range"),
        (5, "duplicate_review_id")]
    assert page.entries == 6
    with pytest.raises(ParseError) as err:
        SITE.parse_reviews(b'{"totalCount": 1e400, "reviews": []}', PAGE_URL)
    assert err.value.reason == "unexpected_shape"


def test_nul_and_lone_surrogates_in_text_are_cleaned_for_the_database():
    page = SITE.parse_reviews(
        b'{"reviews": [{"id": 3, "writerNickname": "a\u0000b", '
        b'"review": {"comment": "x\ud800y\ud83d\ude00", "starAvg": 5}}]}', PAGE_URL)
    review = page.reviews[0]
    assert review.writer_nickname == "ab"
    assert review.comment == "x\ufffdy\U0001f600"
    review.comment.encode("utf-8")  # storable: no lone surrogate left


def test_an_html_error_page_instead_of_reviews_is_invalid_json():
    with pytest.raises(ParseError) as err:
        SITE.parse_reviews(b"<!doctype html><title>Error</title>")
    assert err.value.reason == "invalid_json"


# --- photo validation -----------------------------------------------------------------------
def test_a_valid_photo_is_described_by_its_decoded_facts():
    body = _jpeg((64, 48))
    image = validate_image(body, "image/jpeg", **LIMITS)
    assert (image.format, image.width, image.height) == ("jpeg", 64, 48)
    assert image.sha256 == hashlib.sha256(body).hexdigest() and image.size_bytes == len(body)


@pytest.mark.parametrize("make_body, content_type, reason", [
    (lambda: b"", "image/jpeg", "empty_image"),
    (lambda: b"<html><body>not found</body></html>", "image/jpeg", "not_image"),
    (lambda: _jpeg((400, 300))[:700], "image/jpeg", "truncated_image"),
    (lambda: b"%PDF-1.4 fake", "text/plain", "wrong_content_type"),
    (lambda: _png_header_only(30000, 30000), "image/png", "image_too_large"),
    (lambda: _jpeg() + b"\0" * 30, "image/jpeg", None),
])
def test_bad_photos_are_rejected_with_a_reason(make_body, content_type, reason):
    body = make_body()
    if reason is None:  # trailing junk after a complete JPEG is still a complete photo
        assert validate_image(body, content_type, **LIMITS).format == "jpeg"
        return
    with pytest.raises(ImageRejected) as err:
        validate_image(body, content_type, **LIMITS)
    assert err.value.reason == reason


def test_byte_limit_rejects_before_decoding():
    with pytest.raises(ImageRejected) as err:
        validate_image(_jpeg(), "image/jpeg", max_pixels=10**9, max_bytes=100)
    assert err.value.reason == "image_too_large"


# --- plumbing -------------------------------------------------------------------------------
def test_retry_after_reads_seconds_and_http_dates():
    assert retry_after_seconds(b"3") == 3.0
    assert retry_after_seconds(None) == 0.0
    assert retry_after_seconds(b"garbage") == 0.0
    assert retry_after_seconds(b"Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_settings_survive_the_trip_to_the_crawl_subprocess():
    settings = Settings().with_overrides(categories=["10120000", "16220000"], best_n=3,
                                         obey_robots=False, download_delay=0.05,
                                         allowed_hosts=["127.0.0.1:9", "cdn.test"])
    assert Settings.from_env(settings_env(settings)) == settings


def test_the_crawl_worker_preloads_every_crawl_module_and_installs_no_reactor():
    """The forkserver imports ``CRAWL_MODULES`` before any crawl: each must import, and none may
    install Twisted's default reactor (each crawl process installs the asyncio one)."""
    code = ("import importlib, sys; from crawler.worker import CRAWL_MODULES\n"
            "for name in CRAWL_MODULES: importlib.import_module(name)\n"
            "print('twisted.internet.reactor' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_a_crawl_runs_on_uvloop_with_scrapys_stats_api_and_no_per_access_wrapper():
    """The crawl's event loop and stats class, seen from a spider in a Scrapy process."""
    code = """
import asyncio, json, scrapy
from scrapy.crawler import AsyncCrawlerProcess
from crawler.scrapy_settings import scrapy_settings
from shoplens.config import Settings

class Probe(scrapy.Spider):
    name = "probe"
    async def start(self):
        stats = self.crawler.stats
        stats.inc_value("n"); stats.inc_value("n", 2); stats.max_value("m", 3)
        stats.max_value("m", 1); stats.set_value("s", "x")
        print(json.dumps({"loop": type(asyncio.get_running_loop()).__module__,
                          "stats": type(stats).__name__,
                          "values": {k: stats.get_value(k) for k in ("n", "m", "s")},
                          "wrapped": stats.inc_value.__func__ is not type(stats).inc_value}))
        return
        yield

chosen = scrapy_settings(Settings())
process = AsyncCrawlerProcess({k: chosen[k] for k in ("ASYNCIO_EVENT_LOOP", "STATS_CLASS")}
                              | {"LOG_LEVEL": "ERROR"})
process.crawl(Probe)
process.start()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["loop"].startswith("uvloop")
    assert probe["stats"] == "PlainStatsCollector"
    assert probe["values"] == {"n": 3, "m": 3, "s": "x"}
    assert probe["wrapped"] is False  # Scrapy's own collector hands out a wrapper per method


def test_the_http_client_picks_scrapys_download_handler_and_an_unknown_one_is_refused():
    off = {"file": None, "s3": None, "ftp": None, "data": None}
    # Twisted is Scrapy's default for http(s): no entry; every non-web scheme is switched off.
    assert scrapy_settings(Settings())["DOWNLOAD_HANDLERS"] == off
    handlers = scrapy_settings(Settings().with_overrides(http_client="aiohttp"))["DOWNLOAD_HANDLERS"]
    assert set(handlers) == {"http", "https", *off}
    assert all(handlers[s].endswith("AiohttpDownloadHandler") for s in ("http", "https"))
    assert all(handlers[s] is None for s in off)
    with pytest.raises(ConfigError, match="http_client"):
        Settings().with_overrides(http_client="curl")


# --- group commit of photo rows -------------------------------------------------------------
def _group_commit_recording(fail_on=None, max_batch=200):
    """A GroupCommit whose blocking commit records each batch and waits for ``gate``."""
    import threading

    from crawler.group_commit import GroupCommit

    batches: list[list[int]] = []
    gate = threading.Event()

    def commit(entries):
        gate.wait(5)
        batches.append(list(entries))
        if fail_on is not None and fail_on in entries:
            raise RuntimeError("database went away")
        return [e * 10 for e in entries]

    return GroupCommit(commit, max_batch=max_batch), batches, gate


def test_entries_arriving_during_a_commit_share_the_next_transaction():
    import asyncio

    async def scenario():
        group, batches, gate = _group_commit_recording()
        first = asyncio.ensure_future(group.submit(1))
        await asyncio.sleep(0.05)  # transaction 1 is running (blocked on the gate)
        rest = [asyncio.ensure_future(group.submit(n)) for n in (2, 3, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*rest), batches, group.transactions

    first, rest, batches, transactions = asyncio.run(scenario())
    assert batches == [[1], [2, 3, 4]] and transactions == 2
    assert first == 10 and rest == [20, 30, 40]  # each waiter gets its own row's result


def test_a_lone_entry_is_committed_at_once_and_batches_respect_the_cap():
    import asyncio

    async def scenario():
        group, batches, gate = _group_commit_recording(max_batch=2)
        gate.set()
        assert await group.submit(7) == 70  # no timer to wait for
        results = await asyncio.gather(*(group.submit(n) for n in range(5)))
        return results, batches

    results, batches = asyncio.run(scenario())
    assert results == [0, 10, 20, 30, 40]
    assert batches[0] == [7] and all(len(b) <= 2 for b in batches)
    assert sorted(n for b in batches[1:] for n in b) == [0, 1, 2, 3, 4]


def test_a_failed_transaction_fails_exactly_its_own_entries():
    import asyncio

    async def scenario():
        group, batches, gate = _group_commit_recording(fail_on=2)
        first = asyncio.ensure_future(group.submit(1))
        await asyncio.sleep(0.05)
        doomed = [asyncio.ensure_future(group.submit(n)) for n in (2, 3)]
        await asyncio.sleep(0.05)
        gate.set()
        outcomes = await asyncio.gather(first, *doomed, return_exceptions=True)
        later = await group.submit(4)
        return outcomes, later

    outcomes, later = asyncio.run(scenario())
    assert outcomes[0] == 10
    assert all(isinstance(o, RuntimeError) for o in outcomes[1:])
    assert later == 40  # the next transaction goes ahead


def test_a_batch_refused_for_one_entry_is_committed_entry_by_entry_so_only_it_fails():
    """With ``isolate`` saying the error is the data's (not an outage), a failed batch is
    committed again one entry at a time: the culprit gets the error, its batch-mates their
    results."""
    import asyncio
    import threading

    from crawler.group_commit import GroupCommit

    batches: list[list[int]] = []
    gate = threading.Event()

    def commit(entries):
        gate.wait(5)
        batches.append(list(entries))
        if 3 in entries:
            raise ValueError("row 3 out of range")
        return [e * 10 for e in entries]

    async def scenario():
        group = GroupCommit(commit, isolate=lambda exc: isinstance(exc, ValueError))
        first = asyncio.ensure_future(group.submit(1))
        await asyncio.sleep(0.05)
        batch = [asyncio.ensure_future(group.submit(n)) for n in (2, 3, 4)]
        await asyncio.sleep(0.05)
        gate.set()
        outcomes = await asyncio.gather(first, *batch, return_exceptions=True)
        return outcomes, group.transactions

    outcomes, transactions = asyncio.run(scenario())
    assert outcomes[:2] == [10, 20] and outcomes[3] == 40
    assert isinstance(outcomes[2], ValueError)
    assert batches == [[1], [2, 3, 4], [2], [3], [4]] and transactions == 3


# --- only http(s) to allow-listed hosts -----------------------------------------------------
class _FakeStats:
    def __init__(self):
        self.values: dict[str, int] = {}

    def inc_value(self, key, n=1):
        self.values[key] = self.values.get(key, 0) + n


class _FakeCrawler:
    def __init__(self, settings: Settings):
        self.settings = {"SHOPLENS_SETTINGS": settings}
        self.stats = _FakeStats()


SHOP = Settings().with_overrides(shop_base_url="http://shop.test", allowed_hosts=["cdn.test:81"])


@pytest.mark.parametrize("url", [
    "file://shop.test/etc/passwd", "file:///etc/passwd", "ftp://shop.test/x", "s3://shop.test/b/k",
    "data:text/plain,hello", "https://shop.test/goods/1",  # not the base URL's scheme
    "http://cdn.test:82/a.jpg", "http://evil.test/a.jpg", "http://[::1/a",
])
def test_every_scheme_but_the_shops_and_every_other_host_is_dropped(url):
    from scrapy import Request

    from crawler.middlewares import HostAllowListMiddleware, OffsiteRequest

    middleware = HostAllowListMiddleware(_FakeCrawler(SHOP))
    with pytest.raises(OffsiteRequest):
        middleware.process_request(Request(url) if not url.startswith("http://[") else
                                   _unparsable_request(url))


def _unparsable_request(url):
    from scrapy import Request

    request = Request("http://shop.test/")
    request._url = url  # Scrapy refuses to build it; a redirect's Location may still carry it
    return request


def test_the_shop_and_allowed_hosts_pass():
    from scrapy import Request

    from crawler.middlewares import HostAllowListMiddleware

    middleware = HostAllowListMiddleware(_FakeCrawler(SHOP))
    for url in ("http://shop.test/goods/1", "http://cdn.test:81/a.jpg"):
        assert middleware.process_request(Request(url)) is None


def test_an_https_shops_photos_on_its_cdn_are_fetched_over_https_even_when_served_as_http():
    """The real shop (profile ``ohouse``) is https and only its scheme passes the allow-list.
    The target-site notes give its CDN addresses without a scheme, so a photo address served
    as ``http://`` is upgraded to https, as a browser upgrades mixed content, instead of being
    dropped as offsite; an https address and the http replica are left as they are."""
    from scrapy import Request

    from crawler.middlewares import HostAllowListMiddleware
    from crawler.site import ShopSite

    real = Settings().with_overrides(shop="ohouse")
    site = ShopSite(real.shop_base_url, "w=1280&h=1280")
    allow_list = HostAllowListMiddleware(_FakeCrawler(real))
    assert site.scheme == "https"
    for host in real.allowed_hosts:
        for served in (f"http://{host}/uploads/a.jpg?w=720&q=30", f"//{host}/uploads/a.jpg",
                       f"https://{host}/uploads/a.jpg", f"http://{host}:80/uploads/a.jpg"):
            url = site.image_url(served)
            assert url == f"https://{host}/uploads/a.jpg?w=1280&h=1280", served
            assert allow_list.process_request(Request(url)) is None
    assert site.image_url("http://prs.ohouse.com:8080/a.jpg").startswith(
        "https://prs.ohouse.com:8080/a.jpg?")  # only the default port maps to 443
    replica_site = ShopSite(SHOP.shop_base_url, "w=1280")
    assert replica_site.image_url("http://cdn.test:81/a.jpg") == "http://cdn.test:81/a.jpg?w=1280"


def test_the_waf_cookie_is_fetched_only_when_the_shop_refuses_a_call(monkeypatch, tmp_path):
    """No browser before the first JSON call; a 403 starts it once, and the call is retried."""
    import asyncio

    from scrapy import Request
    from scrapy.http import HtmlResponse

    from crawler import middlewares

    browser_calls = []

    async def fake_acquire(page_url, **kwargs):
        browser_calls.append(page_url)
        return {"ohs_waf": "token"}

    monkeypatch.setattr(middlewares, "acquire_cookies", fake_acquire)
    monkeypatch.setattr(middlewares.tempfile, "gettempdir", lambda: str(tmp_path))
    middleware = middlewares.WafCookieMiddleware(_FakeCrawler(SHOP))
    request = Request("http://shop.test/api/goods/reviews?productionId=1",
                      headers={"Referer": "http://shop.test/goods/1"})

    async def scenario():
        assert await middleware.process_request(request) is None
        assert "Cookie" not in request.headers and browser_calls == []
        ok = HtmlResponse(request.url, status=200, body=b"{}", request=request)
        assert await middleware.process_response(request, ok) is ok
        assert browser_calls == []
        refused = HtmlResponse(request.url, status=403, body=b"Access Denied", request=request)
        retry = await middleware.process_response(request, refused)
        assert browser_calls == ["http://shop.test/goods/1"]
        assert await middleware.process_request(retry) is None
        assert retry.headers["Cookie"] == b"ohs_waf=token"

    asyncio.run(scenario())


def _challenge_page() -> bytes:
    """The replica WAF's challenge page, as it serves it in place of a refused JSON answer."""
    from crawler.replica import pages
    from crawler.replica.waf import Waf

    return pages.challenge_page(Waf().script()).encode()


def test_the_wafs_challenge_page_is_told_apart_from_the_shops_own_answers():
    """A guarded JSON call answered by an HTML page that sets the cookie by script (or says
    access is denied) is the WAF's challenge, whatever its status; JSON, a maintenance page, or
    the same page on an unguarded address is not."""
    from crawler.replica import pages
    from crawler.site import ShopSite

    site = ShopSite("http://shop.test")
    api = "http://shop.test/api/goods/reviews?productionId=1"
    html = "text/html; charset=utf-8"
    assert site.is_waf_challenge(api, 200, html, _challenge_page())
    assert site.is_waf_challenge(api, 200, None, b"  " + _challenge_page())  # no Content-Type
    assert site.is_waf_challenge("http://shop.test/_next/data/b1/ko-KR/ranks.json", 200, html,
                                 b"<html><h1>Access Denied</h1></html>")
    assert site.is_waf_challenge(api, 403, html, b"denied")
    assert not site.is_waf_challenge(api, 200, "application/json", b'{"reviews": []}')
    assert not site.is_waf_challenge(  # a review quoting the words is still JSON
        api, 200, "application/json", b'{"comment": "<b>document.cookie</b>"}')
    assert not site.is_waf_challenge(api, 200, html, pages.error_page(200, "점검 중").encode())
    assert not site.is_waf_challenge("http://shop.test/goods/1", 200, html, _challenge_page())
    assert not site.is_waf_challenge("http://cdn.test:81/api/a.jpg", 403, html, b"denied")


def test_a_challenge_page_with_status_200_gets_the_cookie_and_a_retry_then_a_clear_failure(
        monkeypatch, tmp_path):
    """The WAF's challenge page served with 200 is handled as a refusal: the cookie is fetched
    and the call retried with it; still challenged after the renewals, the call fails with
    WafChallenged, recorded as ``waf_challenge`` (never parsed as ``invalid_json``)."""
    import asyncio

    from scrapy import Request
    from scrapy.http import HtmlResponse

    from crawler import failures, middlewares

    browser_calls = []

    async def fake_acquire(page_url, **kwargs):
        browser_calls.append(page_url)
        return {"ohs_waf": f"token{len(browser_calls)}"}

    monkeypatch.setattr(middlewares, "acquire_cookies", fake_acquire)
    monkeypatch.setattr(middlewares.tempfile, "gettempdir", lambda: str(tmp_path))
    middleware = middlewares.WafCookieMiddleware(_FakeCrawler(SHOP))
    request = Request("http://shop.test/api/goods/reviews?productionId=1",
                      headers={"Referer": "http://shop.test/goods/1"})

    def challenge(req):
        return HtmlResponse(req.url, status=200, body=_challenge_page(), request=req)

    async def scenario():
        await middleware.process_request(request)
        retry = await middleware.process_response(request, challenge(request))
        assert isinstance(retry, Request) and browser_calls == ["http://shop.test/goods/1"]
        await middleware.process_request(retry)
        assert retry.headers["Cookie"] == b"ohs_waf=token1"
        for _ in range(middleware.max_renewals - 1):
            retry = await middleware.process_response(retry, challenge(retry))
            await middleware.process_request(retry)
        with pytest.raises(middlewares.WafChallenged) as still:
            await middleware.process_response(retry, challenge(retry))
        return still.value

    still = asyncio.run(scenario())
    assert len(browser_calls) == middleware.max_renewals
    assert failures.classify(still, "reviews")[0] == "waf_challenge"


def test_a_failed_cookie_renewal_is_not_retried_by_every_refused_call(monkeypatch, tmp_path):
    import asyncio

    from scrapy import Request
    from scrapy.http import HtmlResponse

    from crawler import middlewares
    from crawler.browser import BrowserError

    calls = []

    async def failing_acquire(page_url, **kwargs):
        calls.append(page_url)
        raise BrowserError("page set no cookie")

    monkeypatch.setattr(middlewares, "acquire_cookies", failing_acquire)
    monkeypatch.setattr(middlewares.tempfile, "gettempdir", lambda: str(tmp_path))
    middleware = middlewares.WafCookieMiddleware(_FakeCrawler(SHOP))

    async def scenario():
        for n in range(3):
            request = Request(f"http://shop.test/api/goods/reviews?productionId={n}")
            await middleware.process_request(request)
            with pytest.raises(BrowserError):
                await middleware.process_response(request, HtmlResponse(
                    request.url, status=403, body=b"denied", request=request))

    asyncio.run(scenario())
    assert len(calls) == 1


# --- a crawl that lost something never looks finished ---------------------------------------
def _stats(**overrides):
    return {"category_id": "10120000", "finish_reason": "finished", "products": 20,
            "spider_exceptions": 0, "failures": {}, **overrides}


def test_a_clean_category_crawl_has_no_problem():
    from crawler.run import crawl_problem

    assert crawl_problem(_stats()) is None


@pytest.mark.parametrize("overrides, says", [
    ({"spider_exceptions": 2}, "2 unexpected exception"),
    ({"pipeline_exceptions": 1}, "1 unexpected exception(s) in the item pipeline"),
    ({"products": 0, "failures": {"invalid_json": 1}}, "no product crawled"),
    ({"products": 0}, "no product crawled"),
    ({"finish_reason": "shutdown"}, "ended early"),
])
def test_unexpected_exceptions_or_a_lost_category_fail_the_category_crawl(overrides, says):
    from crawler.run import crawl_problem

    assert says in crawl_problem(_stats(**overrides))


def test_an_exception_in_a_callback_is_recorded_and_the_crawl_goes_on():
    """CallbackGuardMiddleware hands the exception to the spider's recorder and returns an
    empty output, so Scrapy carries on with the other requests; HttpError is left to the
    errback and the spider's own abort (IgnoreRequest) passes silently."""
    import asyncio

    from scrapy import Request
    from scrapy.exceptions import IgnoreRequest
    from scrapy.http import HtmlResponse
    from scrapy.spidermiddlewares.httperror import HttpError

    from crawler.middlewares import CallbackGuardMiddleware

    recorded = []

    class Spider:
        async def _unexpected(self, request, exc):
            recorded.append((request.url, type(exc).__name__))

    crawler_ = _FakeCrawler(SHOP)
    crawler_.spider = Spider()
    guard = CallbackGuardMiddleware.from_crawler(crawler_)
    request = Request("http://shop.test/goods/1", meta={"stage": "product", "product_id": 1})
    response = HtmlResponse(request.url, body=b"<html></html>", request=request)

    async def drain(result):
        return [item async for item in result]

    assert asyncio.run(drain(guard.process_spider_exception(response, OverflowError("x")))) == []
    assert recorded == [("http://shop.test/goods/1", "OverflowError")]
    assert guard.process_spider_exception(response, HttpError(response)) is None
    assert guard.process_spider_exception(response, IgnoreRequest("aborting")) is None


# --- size caps ------------------------------------------------------------------------------
def _spider(settings: Settings):
    """A ReviewsSpider with just what building photo requests needs (no crawl, no database)."""
    from crawler.manifest_writer import ProductState
    from crawler.site import ShopSite
    from crawler.spiders.reviews import ReviewsSpider

    spider = ReviewsSpider(category_id="10120000", run_key="unit")
    spider.shop = settings
    spider.site = ShopSite(settings.shop_base_url, settings.image_params)
    spider.states = {1: ProductState()}
    spider.crawler = _FakeCrawler(settings)
    spider.crawler.stats.get_value = lambda key, default=None: default
    spider.crawler.stats.set_value = lambda key, value: None
    spider.recorded = []

    async def record(request, reason, detail, **where):
        spider.recorded.append((reason, where.get("url")))

    spider._record = record
    return spider


def test_pages_and_json_are_capped_apart_from_photos():
    import asyncio

    settings = SHOP.with_overrides(max_page_bytes=300_000, max_image_bytes=9_000_000)
    scrapy_config = scrapy_settings(settings)
    assert scrapy_config["DOWNLOAD_MAXSIZE"] == 300_000  # pages, JSON, robots.txt
    request = asyncio.run(_spider(settings)._photo_request(1, 10, "http://cdn.test:81/a.jpg"))
    assert request.meta["download_maxsize"] == 9_000_000
    assert request.url == "http://cdn.test:81/a.jpg?w=1280&h=1280"
    assert Settings().max_page_bytes < Settings().max_image_bytes


def test_a_bad_photo_address_stored_by_an_older_night_is_recorded_not_raised():
    import asyncio

    spider = _spider(SHOP)
    assert asyncio.run(spider._photo_request(1, 11, "http://cdn.test:99999/a.jpg")) is None
    assert asyncio.run(spider._photo_request(1, 12, "javascript:alert(1)")) is None
    healed = asyncio.run(spider._photo_request(1, 13, "//cdn.test:81/b.jpg"))
    assert healed.url == "http://cdn.test:81/b.jpg?w=1280&h=1280"
    assert spider.recorded == [("bad_photo_url", "http://cdn.test:99999/a.jpg"),
                               ("bad_photo_url", "javascript:alert(1)")]


def test_operations_guide_lists_every_failure_reason_the_crawl_can_record():
    """docs/operations.md's table names each reason code found in the crawler's source."""
    import re
    from pathlib import Path

    from crawler.images import CONTENT_REJECTIONS

    root = Path(__file__).resolve().parents[1]
    source = {name: (root / "crawler" / name).read_text() for name in (
        "site.py", "failures.py", "spiders/reviews.py", "pipelines.py", "middlewares.py")}
    reasons = set(re.findall(r'ParseError\(\s*"([a-z_]+)"', source["site.py"]))
    reasons |= set(re.findall(r'^BAD_[A-Z_]+ = "([a-z_]+)"', source["site.py"], re.M))
    reasons |= set(re.findall(r'return \(?"([a-z_]+)"', source["failures.py"]))
    reasons |= set(re.findall(r'\("([a-z_]+)" if', source["failures.py"]))
    reasons |= set(re.findall(r'else "([a-z_]+)"\)', source["failures.py"]))
    reasons |= set(re.findall(r'_record\([^,]+, "([a-z_]+)"', source["spiders/reviews.py"]))
    reasons |= {r for name in ("pipelines.py", "middlewares.py")
                for r in re.findall(r'reason="([a-z_]+)"', source[name])}
    reasons |= CONTENT_REJECTIONS | set(re.findall(
        r'PhotoRejected\(\s*"([a-z_]+)"', (root / "shoplens" / "photos.py").read_text()))
    assert len(reasons) >= 25, sorted(reasons)  # the patterns above still find the codes
    guide = (root / "docs" / "operations.md").read_text()
    missing = {r for r in reasons if f"`{r}`" not in guide}
    assert not missing and "`http_<status>`" in guide


def _walked(**overrides) -> ProductState:
    """A product walked completely 2 days ago when the ranking said 12 reviews, 4.5 stars."""
    return ProductState(**{"reviews_synced_run": 3, "ranked_at_sync": (12, 4.5),
                           "days_since_sync": 2.0, "failed_since_sync": False, **overrides})


@pytest.mark.parametrize("state, ranking, unchanged", [
    (_walked(), (12, 4.5), True),
    (_walked(), (13, 4.5), False),  # a new review
    (_walked(), (12, 4.4), False),  # same count, other reviews (one deleted, one added)
    (_walked(), (None, 4.5), False),  # the ranking does not say: walk
    (_walked(days_since_sync=7.0), (12, 4.5), False),  # the re-check interval has passed
    (_walked(failed_since_sync=True), (12, 4.5), False),
    (_walked(reviews_synced_run=None, ranked_at_sync=None, days_since_sync=None), (12, 4.5),
     False),  # never walked completely
    (_walked(ranked_at_sync=None), (12, 4.5), False),  # no ranking row of that run
])
def test_a_product_is_skipped_only_when_the_ranking_shows_no_change_since_a_clean_recent_walk(
        state, ranking, unchanged):
    """The skip needs the ranking's review count and rating of the last complete walk, that walk
    younger than ``recheck_unchanged_days`` and no failure since; anything unknown walks."""
    assert state.unchanged_since_sync(*ranking, recheck_days=7) is unchanged


def test_recheck_unchanged_days_comes_from_the_environment_and_is_not_negative():
    assert Settings.from_env({"SHOPLENS_RECHECK_UNCHANGED_DAYS": "2.5"}).recheck_unchanged_days == 2.5
    with pytest.raises(ConfigError, match="recheck_unchanged_days"):
        Settings.from_env({"SHOPLENS_RECHECK_UNCHANGED_DAYS": "-1"})
