"""``python -m crawler``: alias of ``shoplens crawl`` (crawler/cli.py); crawler/run.py starts
each category's crawl child this way."""
from crawler.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
