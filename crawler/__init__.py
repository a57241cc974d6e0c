"""Crawl stage: Scrapy spider for the shop, its local replica, and manifest/object-store writes.

Public entries (each takes a ``shoplens.config.Settings``):
``start_run(settings, run_key) -> run_id``, ``plan_groups(settings) -> [[category_id, ...], ...]``,
``crawl_categories(settings, category_ids, run_key) -> [dict, ...]`` (one process per group;
``crawl_category`` for one), ``finish_run(settings, run_key) -> dict``.
"""
from crawler.run import (CrawlError, crawl_categories, crawl_category, fail_run,  # noqa: F401
                         finish_run, plan_groups, start_run)

__all__ = ["CrawlError", "crawl_categories", "crawl_category", "fail_run", "finish_run",
           "plan_groups", "start_run"]
