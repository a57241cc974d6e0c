"""Crawl stage: Scrapy spider for the shop, its local replica, and manifest/object-store writes.

Public entries (each takes a ``shoplens.config.Settings``):
``start_run(settings, run_key) -> run_id``, ``crawl_category(settings, category_id, run_key) -> dict``,
``finish_run(settings, run_key) -> dict``.
"""
from crawler.run import CrawlError, crawl_category, fail_run, finish_run, start_run  # noqa: F401

__all__ = ["CrawlError", "crawl_category", "fail_run", "finish_run", "start_run"]
