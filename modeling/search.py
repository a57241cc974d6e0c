"""``shoplens search [--index DIR] PHOTO...`` (alias ``python -m modeling search``): the shop's
products most like each photo, from the index in DIR or, without ``--index``, from the current
index of the manifest (``current_search_index``), downloaded once into a local cache folder keyed
by its id (``modeling/catalogue_index.py``).

One JSON object per photo on stdout, in the order given (directories expand to their image
files)::

    {"image": "a.jpg", "top": [{"product_id": 7, "name": "...", "score": 0.83}, ...],
     "confident": true, "confidence": {"rule": "margin", "value": 0.12, "cut": 0.05}}

``confident`` is false when the answer's confidence under the index's calibrated rule is under
its cut ("no confident match": the answer is more likely wrong than the target precision allows;
``rule`` top1 = the best score, margin = best minus runner-up, combined = a fitted mix of both:
``modeling.search_index``) or when the index was never calibrated (rule, value, cut null). An unreadable photo gets ``{"image", "error"}`` on its line and the
others are still answered. Exit status: 0 every photo answered, 2 bad input (an unreadable photo,
no photo, an index directory that is not one, no current index), 1 failed (anything else),
3 the manifest or object store is unreachable.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TextIO

from shoplens.vision import images

log = logging.getLogger(__name__)
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def parser() -> argparse.ArgumentParser:
    from shoplens.cli import argument_parser

    # Output is always JSON lines; --json is accepted like every other command's.
    p = argument_parser("python -m modeling search", main.__doc__)
    p.add_argument("--index", help="search index directory (default: the manifest's current "
                   "index, downloaded to the local cache)")
    p.add_argument("--top", type=int, default=3, help="products per photo (default 3)")
    p.add_argument("--batch", type=int, default=16, help="photos embedded at once")
    p.add_argument("photos", nargs="+", help="photo files or directories of photos")
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
         ) -> int:
    """Products most like each photo, from a search index (JSON lines with scores)"""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.top < 1:
        print("error: --top must be at least 1", file=err)
        return EXIT_BAD_INPUT
    files = images.expand_paths(args.photos)
    if not files:
        print("error: no photo files given", file=err)
        return EXIT_BAD_INPUT
    from modeling.catalogue_index import load_for_queries
    from modeling.search_index import SearchIndexError
    from shoplens.cli import EXIT_UNREACHABLE, ServiceUnreachable

    try:
        index = load_for_queries(args.index or _current_index_dir())
    except (SearchIndexError, LookupError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=err)
        return EXIT_BAD_INPUT
    except ServiceUnreachable as exc:
        print(f"error: {exc}", file=err)
        return EXIT_UNREACHABLE
    if index.threshold is None:
        print("warning: the index has no calibrated threshold; no answer is marked confident",
              file=err)
    unreadable = 0
    try:
        for start in range(0, len(files), args.batch):
            batch = files[start:start + args.batch]
            decoded, errors = {}, {}
            for path in batch:
                try:
                    decoded[path] = images.decode(images.read_file(path), path)
                except images.UnreadableImage as exc:
                    errors[path] = str(exc)
            vectors = index.embedder.embed_decoded(list(decoded.values()))
            answers = dict(zip(decoded, (index.answer(v, args.top) for v in vectors)))
            for path in batch:
                if path in errors:
                    unreadable += 1
                    print(f"error: {errors[path]}", file=err)
                    line = {"image": path, "error": errors[path]}
                else:
                    line = {"image": path, **answers[path]}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, and a distinct status
        log.debug("search failed", exc_info=True)
        print(f"error: search failed: {type(exc).__name__}: {exc}", file=err)
        return EXIT_FAILED
    if unreadable:
        print(f"error: {unreadable} of {len(files)} photo(s) could not be read", file=err)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _current_index_dir():
    from modeling import catalogue_index
    from shoplens.config import Settings

    return catalogue_index.fetch_current(Settings.from_env())[1]


if __name__ == "__main__":
    sys.exit(main())
