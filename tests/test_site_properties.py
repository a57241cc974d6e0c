"""Property: whatever the shop answers, the site adapter parses it or raises ParseError.

The shop's JSON and HTML are untrusted input. Any other exception (OverflowError, RecursionError,
AttributeError, ...) would escape a spider callback and stop a category, so hypothesis feeds the
adapter arbitrary JSON values, arbitrary shapes around the fields it reads, and arbitrary HTML.
"""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crawler.site import ParseError, ShopSite

SITE = ShopSite("http://shop.test", "w=1280&h=1280")
PROPERTY = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Leaves include what JSON parsers produce from hostile text: huge ints, inf, lone surrogates,
# NUL, bools where ints belong.
leaves = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2 ** 62)
          | st.floats(allow_nan=True, allow_infinity=True)
          | st.text() | st.sampled_from(["\x00", "\ud800", "//cdn.test/a.jpg", "/img/a.jpg",
                                         "javascript:alert(1)", "http://cdn.test:99999/a.jpg",
                                         "2026.08.31", "../../../api/admin?x=", "1e400"]))
json_values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "name", "brandName", "sellingPrice", "reviewCount", "reviewAvg",
                         "reviews", "review", "card", "imageUrl", "imgUrl", "comment", "starAvg",
                         "createdAt", "totalCount", "state", "data", "queries", "products",
                         "production", "category", "categories", "title", "writerNickname",
                         "buildId"]) | st.text(max_size=5), inner, max_size=5),
    max_leaves=30)


def _shaped(inner):
    """Arbitrary values in the places the adapter reads, inside the shop's real envelope."""
    product = st.fixed_dictionaries({}, optional={k: inner for k in (
        "id", "name", "brandName", "sellingPrice", "reviewCount", "reviewAvg")})
    review = st.fixed_dictionaries({}, optional={
        "id": inner, "createdAt": inner, "writerNickname": inner,
        "review": st.fixed_dictionaries({}, optional={"starAvg": inner, "comment": inner}) | inner,
        "card": st.fixed_dictionaries({}, optional={"imageUrl": inner, "imgUrl": inner}) | inner})
    query = lambda data: st.fixed_dictionaries({"state": st.fixed_dictionaries(  # noqa: E731
        {"data": data}) | inner}) | inner
    ranking = st.fixed_dictionaries({"pageProps": st.fixed_dictionaries({"dehydratedState":
        st.fixed_dictionaries({"queries": st.lists(query(st.fixed_dictionaries({}, optional={
            "products": st.lists(product | inner, max_size=4) | inner,
            "category": st.fixed_dictionaries({}, optional={"id": inner, "title": inner})}
        )), max_size=3) | inner})})})
    reviews = st.fixed_dictionaries({}, optional={
        "totalCount": inner, "reviews": st.lists(review | inner, max_size=5) | inner})
    production = st.fixed_dictionaries({}, optional={"production": product | inner,
                                                     "categories": st.lists(inner) | inner,
                                                     "review": inner})
    page = st.fixed_dictionaries({"props": st.fixed_dictionaries({"pageProps": st.fixed_dictionaries(
        {"dehydratedState": st.fixed_dictionaries({"queries": st.lists(query(production),
                                                                        max_size=3) | inner})})})})
    return ranking, reviews, page


RANKING, REVIEWS, PRODUCT_DATA = _shaped(json_values)


def _dumps(value) -> str:
    # ensure_ascii keeps lone surrogates as \ud800 escapes, as a hostile server could send them.
    return json.dumps(value, allow_nan=True)


def _parses_or_parse_error(parse, *args):
    try:
        parse(*args)
    except ParseError as exc:
        assert exc.reason and isinstance(exc.reason, str)


def _next_page(data_text: str, extra: str = "") -> str:
    return (f'<html><head>{extra}</head><body><script id="__NEXT_DATA__" '
            f'type="application/json">{data_text}</script></body></html>')


@PROPERTY
@given(json_values | RANKING)
def test_any_ranking_json_parses_or_is_a_parse_error(value):
    """Arbitrary JSON (and arbitrary values inside the real envelope) as ranks data."""
    _parses_or_parse_error(SITE.parse_ranking, _dumps(value).encode())


@PROPERTY
@given(json_values | REVIEWS)
def test_any_reviews_json_parses_or_is_a_parse_error(value):
    """Arbitrary JSON as a reviews page; every kept photo address is an absolute http(s) URL."""
    try:
        page = SITE.parse_reviews(_dumps(value).encode(), "http://shop.test/api/goods/reviews")
    except ParseError:
        return
    for review in page.reviews:
        assert review.photo_url is None or review.photo_url.startswith(("http://", "https://"))
        for text in (review.comment, review.writer_nickname):
            assert text is None or ("\x00" not in text and text.encode("utf-8"))
        assert 1 <= review.id < 2 ** 63


@PROPERTY
@given(json_values | PRODUCT_DATA)
def test_any_product_page_data_parses_or_is_a_parse_error(value):
    _parses_or_parse_error(SITE.parse_product_page, _next_page(_dumps(value)))


@PROPERTY
@given(st.text(max_size=400) | st.binary(max_size=400).map(lambda b: b.decode("latin-1")))
def test_any_text_as_json_parses_or_is_a_parse_error(text):
    for parse in (SITE.parse_ranking, SITE.parse_reviews):
        _parses_or_parse_error(parse, text)
        _parses_or_parse_error(parse, text.encode("utf-8", "surrogatepass"))


html_fragments = st.lists(st.sampled_from([
    "<html>", "<head>", "<body>", "</script>", '<script id="__NEXT_DATA__">',
    '<script id="__NEXT_DATA__" type="application/json">', "<script src=\"/_next/static/",
    '/_buildManifest.js">', '{"buildId": "', '"}', "<!--", "-->", "<![CDATA[", "\x00", "\ud800",
    "&amp;", "<", ">", '"', "'", "../../../api/admin?x=", "{", "}", "[", "]",
]) | st.text(max_size=20), max_size=40).map("".join)


@PROPERTY
@given(html_fragments | st.text(max_size=300))
def test_any_html_parses_or_is_a_parse_error(html):
    """Arbitrary HTML as a ranks page (buildId) and as a product page."""
    try:
        build = SITE.parse_build_id(html)
    except ParseError:
        pass
    else:  # a buildId that comes out is safe to splice into a URL
        assert SITE.ranks_data_url(build, "10120000").startswith(
            f"http://shop.test/_next/data/{build}/ko-KR/ranks.json?")
    _parses_or_parse_error(SITE.parse_product_page, html)


@PROPERTY
@given(json_values)
def test_any_value_as_a_photo_address_is_an_http_url_or_a_parse_error(value):
    try:
        url = SITE.photo_address(value, "http://shop.test/api/goods/reviews?page=1")
    except ParseError as exc:
        assert exc.reason == "bad_photo_url"
        return
    assert url.startswith(("http://", "https://"))
    SITE.image_url(url)  # a stored address never raises on a later night


@PROPERTY
@given(st.integers(min_value=100, max_value=599), st.none() | st.text(max_size=40),
       st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_answer_to_a_json_call_is_a_waf_challenge_or_not_never_an_exception(
        status, content_type, body):
    """Telling the WAF's challenge from the shop's answer reads only untrusted bytes: it
    answers yes or no for anything, and a JSON document is never taken for a challenge."""
    url = "http://shop.test/api/goods/reviews?productionId=1"
    verdict = SITE.is_waf_challenge(url, status, content_type, body)
    assert isinstance(verdict, bool)
    if (status == 200 and body.lstrip()[:1] in (b"{", b"[")
            and "html" not in (content_type or "").lower()):
        assert verdict is False
