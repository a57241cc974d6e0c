"""Scrapy's downloader, with a download counted against its host's limit as soon as it starts.

Scrapy 2.19 (asyncio reactor) starts each download of a slot's queue as a task and counts it in
the slot's ``transferring`` set only once that task runs, so with no download delay one pass over
the queue starts every queued request at once: measured 16 in flight to one host whose limit was
8 (``CONCURRENT_REQUESTS_PER_DOMAIN``). Counting the request when its task is created keeps the
per-host limit; Scrapy's own ``_download`` adds it again (a set) and removes it when done.
"""
from __future__ import annotations

from scrapy.core.downloader import Downloader


class PerHostLimitDownloader(Downloader):
    def _wait_for_download(self, slot, request, queue_dfd):
        slot.transferring.add(request)  # before the next free_transfer_slots() check
        return super()._wait_for_download(slot, request, queue_dfd)
