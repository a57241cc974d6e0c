"""The local replica of the shop (store.ohou.se) that tests, benchmarks and the demo crawl.

Contract: docs/replica.md. ``ReplicaShop`` runs it in a background thread;
``python -m crawler.replica`` runs it as a server.
"""
from .server import ReplicaShop, load_sources

__all__ = ["ReplicaShop", "load_sources"]
