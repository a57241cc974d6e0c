"""``shoplens identify [--gallery LISTING.csv | --index DIR] [--json] PHOTO...``: every product in
each photo (alias ``python -m modeling identify``; the work is :func:`modeling.identify.identify`).

``--gallery`` indexes a CSV with the columns ``path,product_id,class`` (paths relative to the
CSV's folder; class a COCO class name, empty = any product), cached under
``SHOPLENS_IDENTIFY_CACHE_DIR`` so the next call embeds nothing. ``--index`` searches a saved
search index directory; with neither, the shop's current search index (the manifest's
``current_search_index``, downloaded once into the local cache, as ``shoplens search`` does).
A shop index's products have a class when they carry ``class``, or a ``category`` mapped by
``SHOPLENS_IDENTIFY_CATEGORY_CLASSES`` (the nightly index records each product's shop category id
and name; an unmapped category matches every object).

One JSON object per photo on stdout, in the order given (directories expand to their images)::

    {"image": "room.jpg", "objects": [{"box": [x0, y0, x1, y1], "class": "chair", "score": 0.83,
     "top": [{"product_id": "502.675.58", "score": 0.71}, ...]}]}

``box`` in image pixels, ``score`` the detector's, ``top`` the ``--top`` (default 10) best
products of that class (a listing's product ids as written there). When nothing is detected the
photo is one object: box = the whole image, ``class`` and ``score`` null, searched over every
product. An unreadable photo gets ``{"image", "error"}`` on its line and the others are still
answered. Exit status: 0 every photo answered; 2 bad input (a bad listing or index, no current
index, a missing detector model, an unreadable photo, no photo); 1 failed (anything else);
3 the manifest or object store is unreachable.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TextIO

from shoplens.config import ConfigError, Settings
from shoplens.vision import images

log = logging.getLogger(__name__)
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def parser() -> argparse.ArgumentParser:
    from shoplens.cli import argument_parser

    p = argument_parser("python -m modeling identify", main.__doc__)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--gallery", help="CSV listing path,product_id,class of the gallery photos")
    source.add_argument("--index", help="a saved search index directory (default: the shop's "
                        "current index)")
    p.add_argument("--top", type=int, default=None, help="products per object (default 10)")
    p.add_argument("photos", nargs="+", help="photo files or directories of photos")
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None,
         settings: Settings | None = None, detector=None) -> int:
    """Every product in each photo: detected objects with their best gallery products (JSON lines)"""
    from shoplens.cli import own_output_mode

    with own_output_mode():
        return _identify(argv, out or sys.stdout, err or sys.stderr, settings, detector)


def _identify(argv, out: TextIO, err: TextIO, settings: Settings | None, detector) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.json:
        from shoplens.cli import set_json_mode

        set_json_mode(True)
    try:
        settings = settings or Settings.from_env()
        if args.top is not None:
            settings = settings.with_overrides(identify_top=args.top)
    except ConfigError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_BAD_INPUT
    files = images.expand_paths(args.photos)
    if not files:
        print("error: no photo files given", file=err)
        return EXIT_BAD_INPUT
    from modeling.identify import (Gallery, IdentifyError, check_classes, decode_for_identify,
                                   identify, identify_detector)
    from modeling.catalogue_index import load_for_queries
    from modeling.search_index import SearchIndexError
    from shoplens.cli import EXIT_UNREACHABLE, ServiceUnreachable
    from shoplens.photos import PhotoRejected
    from shoplens.vision.detector import DetectorError

    try:
        check_classes(settings.identify_classes)
        if detector is None:
            detector = identify_detector(settings)
        if args.gallery:
            gallery = Gallery.from_listing(args.gallery, settings)
        else:
            index_dir = args.index or _current_index_dir(settings)
            gallery = Gallery.from_index(load_for_queries(index_dir, settings), settings)
    except (IdentifyError, SearchIndexError, DetectorError, LookupError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=err)
        return EXIT_BAD_INPUT
    except ServiceUnreachable as exc:
        print(f"error: {exc}", file=err)
        return EXIT_UNREACHABLE
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, and a distinct status
        log.debug("identify setup failed", exc_info=True)
        print(f"error: identify failed: {type(exc).__name__}: {exc}", file=err)
        return EXIT_FAILED
    unreadable = 0
    try:
        for path in files:
            try:
                photo = decode_for_identify(images.read_file(path), settings)
            except (images.UnreadableImage, PhotoRejected) as exc:
                message = f"{path}: {exc.message}" if isinstance(exc, PhotoRejected) else str(exc)
                unreadable += 1
                print(f"error: {message}", file=err)
                line = {"image": path, "error": message}
            else:
                line = {"image": path, "objects": identify(photo.image, gallery, detector, settings,
                                                           full_size=(photo.width, photo.height))}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
    except Exception as exc:  # noqa: BLE001
        log.debug("identify failed", exc_info=True)
        print(f"error: identify failed: {type(exc).__name__}: {exc}", file=err)
        return EXIT_FAILED
    if unreadable:
        print(f"error: {unreadable} of {len(files)} photo(s) could not be read", file=err)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _current_index_dir(settings: Settings):
    """The shop's current search index, downloaded into the local cache (as ``shoplens search``)."""
    from modeling import catalogue_index

    return catalogue_index.fetch_current(settings)[1]


if __name__ == "__main__":
    sys.exit(main())
