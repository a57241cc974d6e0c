"""``--faults hostile-data=P``: malformed shop answers, the kind a real shop can serve.

Unlike the transient faults, hostile data is content: a fixed share P of the products
(chosen per seed) always answer one hostile variant each, so a crawl meets the same answers
every night. The kinds are dealt to those products in turn (sorted by id), so a catalogue with
at least ``len(KINDS)`` hostile products serves every kind. Each answer is real JSON text that
``json.dumps`` could not produce (``1e400``, ``Infinity``, deep nesting, lone surrogates), spliced
in where a sentinel value stands.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

from .catalog import Catalog, Product

FAULT_NAME = "hostile-data"
# Where each kind is served: the product page's production data, the reviews API page that
# holds the product's newest review, or the address of its newest photo review.
PRODUCT_PAGE_KINDS = ("product_id_overflow", "review_count_overflow", "queries_not_objects",
                      "deep_nesting", "infinity_id")
REVIEW_KINDS = ("review_id_1e400", "review_id_bool", "review_id_fraction", "review_id_overflow",
                "duplicate_review_id", "nul_and_surrogate", "reviews_not_a_list")
PHOTO_KINDS = ("photo_protocol_relative", "photo_relative", "photo_javascript", "photo_bad_port")
KINDS = PRODUCT_PAGE_KINDS + REVIEW_KINDS + PHOTO_KINDS

SENTINEL = "@@hostile@@"
DEEP = 50_000  # nesting levels: far beyond Python's recursion limit
# What the nul_and_surrogate comment is: text with a NUL and a lone surrogate, as JSON escapes.
NUL_AND_SURROGATE_JSON = '"before\\u0000after\\ud800end"'


@dataclass(frozen=True)
class HostileProduct:
    product_id: int
    kind: str
    review_id: int | None  # the review whose entry or photo is hostile (None: the product page)


def assign(catalog: Catalog, fraction: float, seed: int) -> dict[int, HostileProduct]:
    """The hostile products and their kinds: round(fraction x products), dealt kinds in turn."""
    if fraction <= 0:
        return {}
    ids = sorted(catalog.products)
    chosen = sorted(random.Random(f"hostile:{seed}").sample(ids, round(fraction * len(ids))))
    out = {}
    for n, product_id in enumerate(chosen):
        kind = KINDS[n % len(KINDS)]
        product = catalog.products[product_id]
        out[product_id] = HostileProduct(product_id, kind, _target_review(catalog, product, kind))
    return out


def _target_review(catalog: Catalog, product: Product, kind: str) -> int | None:
    newest = catalog.sorted_reviews(product, "recent")
    if kind in PRODUCT_PAGE_KINDS:
        return None
    if kind in PHOTO_KINDS:
        photos = [r for r in newest if r.photo_id]
        return photos[0].id if photos else None
    return newest[0].id if newest else None


def _raw(data, splice: str | None) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text if splice is None else text.replace(json.dumps(SENTINEL), splice, 1)


def product_queries(queries: list[dict], hostile: HostileProduct) -> tuple[list, str | None]:
    """The product page's dehydrated queries made hostile, and raw JSON for the sentinel."""
    production = queries[0]["state"]["data"]["production"]
    kind = hostile.kind
    if kind == "product_id_overflow":
        production["id"] = 2 ** 70
    elif kind == "review_count_overflow":
        production["reviewCount"] = 3_000_000_000
    elif kind == "queries_not_objects":
        return [{"state": "x"}, None, {"state": {"data": None}}], None
    elif kind == "deep_nesting":
        queries[0]["state"]["data"]["production"] = SENTINEL
        return queries, "[" * DEEP + "]" * DEEP
    elif kind == "infinity_id":
        production["id"] = SENTINEL
        return queries, "Infinity"
    return queries, None


def reviews_page(data: dict, hostile: HostileProduct, shop_url: str) -> str:
    """A reviews API answer as JSON text, hostile where it lists the target review."""
    reviews = data["reviews"]
    target = next((r for r in reviews if r["id"] == hostile.review_id), None)
    if target is None:
        return _raw(data, None)
    kind, splice = hostile.kind, None
    if kind == "review_id_1e400":
        target["id"], splice = SENTINEL, "1e400"
    elif kind == "review_id_bool":
        target["id"] = True
    elif kind == "review_id_fraction":
        target["id"] = target["id"] + 0.9
    elif kind == "review_id_overflow":
        target["id"] = 2 ** 70
    elif kind == "duplicate_review_id":
        reviews.append(dict(target))
    elif kind == "nul_and_surrogate":
        target["review"]["comment"], splice = SENTINEL, NUL_AND_SURROGATE_JSON
    elif kind == "reviews_not_a_list":
        data["reviews"] = {str(r["id"]): r for r in reviews}
    elif kind in PHOTO_KINDS:
        card = target["card"]
        for key, url in card.items():
            card[key] = _photo_address(kind, url, shop_url)
    return _raw(data, splice)


def _photo_address(kind: str, url: str, shop_url: str) -> str:
    scheme, rest = url.split("://", 1)
    host, _, path = rest.partition("/")
    if kind == "photo_protocol_relative":
        return f"//{host}/{path}"
    if kind == "photo_relative":
        return f"/{path}"
    if kind == "photo_javascript":
        return "javascript:alert(document.cookie)"
    return f"{scheme}://{host.split(':')[0]}:99999/{path}"  # photo_bad_port
