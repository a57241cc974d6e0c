"""Crawl stage: Scrapy spider for the shop, its local replica, and manifest/object-store writes."""
