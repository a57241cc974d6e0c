"""``python -m crawler``: alias of ``shoplens crawl`` (crawler/cli.py); crawler/run.py starts
each group of categories' crawl child this way when it cannot fork it from the warm crawl worker
(crawler/worker.py, which ends its forked child the same way).

The child ends with ``os._exit`` once its output is flushed: everything it wrote is committed or
closed by then (the stats file, the manifest rows, the stored objects), and tearing down the
interpreter's heap after a crawl cost 2-3 s of wall time on the loaded 2-core machine
(docs/benchmarks.md), more than an incremental night's crawling.
"""
import logging
import os
import sys

from crawler.cli import main

if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
