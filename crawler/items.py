"""What the spider hands to the item pipelines."""
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
