"""What the spider hands to the item pipelines: downloaded review photos and catalogue images."""
from __future__ import annotations

from dataclasses import dataclass, field

from scrapy import Request


@dataclass
class ReviewPhotoItem:
    """A downloaded review photo, not validated yet."""
    body: bytes = field(repr=False)
    content_type: str | None
    url: str
    review_id: int
    product_id: int
    category_id: str
    request: Request = field(repr=False)  # kept so that a transiently broken body can be downloaded again


@dataclass
class CatalogueImageItem:
    """A downloaded catalogue image of a product (its ``originalImageUrl``), not validated yet."""
    body: bytes = field(repr=False)
    content_type: str | None
    url: str  # what was downloaded (at the fixed size)
    source_url: str  # the address as the shop gave it, without resize parameters
    product_id: int
    category_id: str
    request: Request = field(repr=False)
