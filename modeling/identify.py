"""Every product in a photo (issue 17): detect the objects, then identify each one.

:func:`identify` is the entry point; ``shoplens identify`` (``modeling/identify_cli.py``) wraps it.

1. **Detect**: YOLOX-Nano boxes (:mod:`shoplens.vision.detector`, COCO classes, image pixels) of
   the home-goods classes in ``Settings.identify_classes`` that the gallery has products of (all
   of them when a classless product matches any object) scoring at least
   ``identify_min_score``; the ``identify_max_per_class`` best of each class (0: no such cap),
   and of those the ``identify_max_objects`` best, are kept.
2. **Crop** (:func:`shoplens.vision.crops.square_crop`, the crop geometry salvage shares): each
   box grown by ``identify_margin`` of its width/height on every side, then to a square around
   its centre with the photo's own pixels (white where the square leaves the photo: catalogue
   photos are shot on white), so the embedder's square input sees the whole object instead of
   its middle; cut and scaled in one resampling to the embedder's input.
3. **Embed** with the gallery's embedder (``identify_flip``: mean with the mirrored crop), all
   crops in ONE batch at ``identify_crop_size`` (0: the gallery embedding's size). With
   ``identify_pooling = "roi"`` there are no crops: one backbone pass over the whole photo at
   ``identify_roi_size`` px, each box's features average-pooled from the last feature map
   (:func:`roi_features`).
4. **Search** the gallery restricted to products whose class is the detected class (exact
   cosine over that class's products); products with no class (empty) match any object. Per
   object the top ``k`` products with scores.

**Cost options**: :func:`decode_for_identify` decodes a JPEG at a reduced scale
(``identify_decode_side``; detection and crops then work on it, boxes are reported in the full
photo's pixels via ``full_size``); :func:`identify_detector` runs ``identify_detector_model_path``
(e.g. an int8 copy) instead of the filter's model. docs/benchmarks.md says what each costs.

**Whole-image fallback**: when no box is kept, the photo is one object with ``box`` = the whole
image ``[0, 0, width, height]``, ``class`` = None and ``score`` = None (no detection), searched
unrestricted. **Per class** (``identify_fallback_classes``, default none): such a class with no
box kept gets the whole photo as its object (``class`` the class, ``score`` None), searched within
the class, embedded by ``identify_fallback_embedding`` when set (a head trained on other
products, :mod:`modeling.identify_head`; its own index of the gallery; on the same backbone the
photo rides in the crops' batch) -- a table hidden under chairs is still searched.

A :class:`Gallery` is a :class:`~modeling.search_index.SearchIndex` whose products carry a
``class`` (COCO names, comma-separated when a product is several, e.g. a sofa bed; "" = any) and
the product id to report (``ref``):

- :meth:`Gallery.from_listing`: a CSV ``path,product_id,class``; indexed once and kept under
  ``identify_cache_dir`` keyed by the listing's content, each photo's size and mtime, and the
  embedding config (backbone, size, weights, trained head, trimming, flip, room views), so a
  rerun embeds nothing. ``identify_embedding`` names a trained head
  (``python -m modeling.identify_head``). Catalogue photos on a white backdrop are trimmed to
  the product's extent first (``identify_trim_gallery``). With ``identify_gallery_backgrounds``
  (room photos) each such photo is also seen in rooms (:func:`room_view_means`,
  :func:`with_room_views`): its vector leans towards what a crop of the product in a room looks
  like.
- :meth:`Gallery.from_index`: the shop's search index; a product's class is its ``class``
  entry, or its ``category`` (the nightly index records the shop's category id, and its name as
  ``category_name``) mapped by ``identify_category_classes`` (by id, else by name); ids are the
  shop's.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

from shoplens.config import Settings
from shoplens.photos import DEFAULT_LIMITS, Photo, PhotoLimits, decode_photo
from shoplens.progress import progress
from shoplens.vision import images
from shoplens.vision.crops import square_crop, trimmed_to_product
from shoplens.vision.detector import COCO_CLASSES, Detector
from shoplens.vision.embedding import NETWORK_CACHE, Embedder, l2_normalise
from shoplens.vision.room_views import (background_photos, load_backgrounds,
                                        product_on_room_patch, product_cutout)

GALLERY_CACHE_FORMAT = 2
WHITE = (255, 255, 255)
MIN_BOX_SIDE = 8.0
# Room photos a gallery's room views are made on, at most (held decoded, <= 640 px, meanwhile).
MAX_GALLERY_BACKGROUNDS = 256
# Up to this many products of a class are scored exactly (one matrix product) per object.
EXACT_SEARCH_LIMIT = 50_000


class IdentifyError(ValueError):
    """Bad input to identify (a listing, a setting): the message says what and where."""


@dataclass(frozen=True)
class DetectedBox:
    """One object to identify: image pixels; ``label``/``score`` None for the whole image."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None
    score: float | None

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


# --- the photo and the detector ---------------------------------------------------------------
def decode_for_identify(data: bytes, settings: Settings, limits: PhotoLimits = DEFAULT_LIMITS) -> Photo:
    """The photo as identify reads it: through the one decoder, a JPEG at the reduced scale
    ``identify_decode_side`` asks for (full resolution when 0). Pass ``(photo.width,
    photo.height)`` as ``identify(..., full_size=)`` so boxes come back in full-size pixels."""
    return decode_photo(data, limits, reduce_to=settings.identify_decode_side or None)


def identify_detector(settings: Settings, threads: int | None = None) -> Detector:
    """The detector identify runs: ``identify_detector_model_path`` (e.g. an int8 copy), else
    the filter's ``detector_model_path``."""
    return Detector(settings.identify_detector_model_path or settings.detector_model_path,
                    min_score=settings.identify_min_score,
                    threads=settings.detector_threads if threads is None else threads)


# --- detection and crops ----------------------------------------------------------------------
def check_classes(classes: Iterable[str]) -> tuple[str, ...]:
    classes = tuple(classes)
    unknown = sorted(set(classes) - set(COCO_CLASSES))
    if unknown:
        raise IdentifyError(f"not COCO classes the detector knows: {', '.join(unknown)}")
    return classes


def detect_objects(image: Image.Image, detector: Detector, settings: Settings,
                   searchable: frozenset[str] | None = None) -> list[DetectedBox]:
    """The configured classes' boxes on an upright RGB photo, best first (at most
    ``identify_max_objects``); empty when none is found. ``searchable``: only these classes
    (those the gallery has products of; None = all), so no crop is embedded only to be
    searched among no products and no such box takes a place under the caps."""
    wanted = set(check_classes(settings.identify_classes))
    if searchable is not None:
        wanted &= searchable
    out = []
    for b in detector.detect(image):
        if (b.label in wanted and b.score >= settings.identify_min_score
                and b.x2 - b.x1 >= MIN_BOX_SIDE and b.y2 - b.y1 >= MIN_BOX_SIDE):
            out.append(DetectedBox(b.x1, b.y1, b.x2, b.y2, b.label, float(b.score)))
    out.sort(key=lambda d: -d.score)
    if settings.identify_max_per_class:
        per: dict[str, int] = {}
        capped = []
        for d in out:
            per[d.label] = per.get(d.label, 0) + 1
            if per[d.label] <= settings.identify_max_per_class:
                capped.append(d)
        out = capped
    return out[:settings.identify_max_objects]


def whole_image(image: Image.Image) -> DetectedBox:
    return DetectedBox(0.0, 0.0, float(image.width), float(image.height), None, None)


def _feature_map_model(embedder: Embedder, size: int):
    """The embedder's backbone at ``size`` px up to its last feature map (before the global
    pooling), with the same weights; built once per (embedder, size)."""
    cache = embedder.__dict__.setdefault("_roi_models", {})
    if size not in cache:
        import keras

        settings = embedder.settings or Settings()
        if settings.model_init == "random":
            keras.utils.set_random_seed(settings.model_seed)
        full = embedder._spec.build(size, settings)
        if embedder.weights_file:
            full.load_weights(embedder.weights_file)
        try:
            pooled = full.get_layer("avg_pool")
        except ValueError:
            raise IdentifyError(f"identify_pooling 'roi' needs a backbone whose features are a "
                                f"global average pool ({embedder.backbone} has none)") from None
        cache[size] = keras.Model(full.input, pooled.input)
    return cache[size]


def roi_features(embedder: Embedder, image: Image.Image, boxes: list, size: int) -> np.ndarray:
    """float32 (N, F): each box's backbone features average-pooled from ONE pass over the whole
    photo (fitted, aspect kept, into a white ``size`` square at its top-left corner) instead of
    one pass per crop. A box smaller than a cell takes the cell under its centre."""
    scale = size / max(image.width, image.height)
    canvas = Image.new("RGB", (size, size), WHITE)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas.paste(image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), (0, 0))
    x = np.asarray(canvas, dtype=np.float32)[None]
    fmap = np.asarray(_feature_map_model(embedder, size).predict_on_batch(x))[0]
    cells = fmap.shape[0]
    stride = size / cells
    centres = (np.arange(cells) + 0.5) * stride
    out = []
    for x0, y0, x1, y1 in boxes:
        x0, y0, x1, y1 = (c * scale for c in (x0, y0, x1, y1))
        cols = np.nonzero((centres >= x0) & (centres <= x1))[0]
        rows = np.nonzero((centres >= y0) & (centres <= y1))[0]
        if not len(cols):
            cols = np.array([min(cells - 1, int((x0 + x1) / 2 / stride))])
        if not len(rows):
            rows = np.array([min(cells - 1, int((y0 + y1) / 2 / stride))])
        out.append(fmap[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].mean(axis=(0, 1)))
    return np.stack(out).astype(np.float32) if out else np.zeros((0, fmap.shape[-1]), np.float32)


def embed_images(embedder: Embedder, photos: list[Image.Image], flip: bool = False) -> np.ndarray:
    """Unit embeddings of upright RGB photos; with ``flip`` the mean with their mirror images."""
    vectors = embedder.embed_decoded(photos)
    if flip and photos:
        mirrored = embedder.embed_decoded([ImageOps.mirror(p) for p in photos])
        vectors = l2_normalise(vectors + mirrored)
    return vectors


def gallery_backgrounds(settings: Settings) -> list[Path]:
    """The room photos ``identify_gallery_backgrounds`` names ([] when off); a clear error for
    a source that is missing or names no photo."""
    source = settings.identify_gallery_backgrounds
    if not source:
        return []
    path = Path(source).expanduser()
    if not path.exists():
        raise IdentifyError(f"identify_gallery_backgrounds: {path} does not exist")
    try:
        photos = background_photos(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentifyError(f"identify_gallery_backgrounds: cannot read {path}: {exc}") from None
    missing = [p for p in photos if not p.is_file()]
    if missing:
        raise IdentifyError(f"identify_gallery_backgrounds: {missing[0]} (listed in {path}) "
                            "not found")
    if not photos:
        raise IdentifyError(f"identify_gallery_backgrounds: {path} names no photo")
    if len(photos) > MAX_GALLERY_BACKGROUNDS:  # evenly spaced: each is kept decoded meanwhile
        step = len(photos) / MAX_GALLERY_BACKGROUNDS
        photos = [photos[int(i * step)] for i in range(MAX_GALLERY_BACKGROUNDS)]
    return photos


def room_view_means(embedder: Embedder, photos: list[Image.Image], seeds: list[int],
                    backgrounds: list[Image.Image], views: int) -> np.ndarray:
    """(N, dim): for each photo (as decoded) on a white backdrop, the mean embedding of ``views``
    views of its product on room patches (:func:`product_on_room_patch`: the trimmed square
    with a patch of a ``backgrounds`` photo behind it); NaN for a photo with nothing to cut
    out. ``seeds`` (one per photo) make the views repeatable."""
    # Made at the embedder's square (what it fits a photo into), so no second resampling.
    side = images.margin_size(embedder.image_size) if embedder.image_size else 320
    made, owners = [], []
    for i, (photo, seed) in enumerate(zip(photos, seeds)):
        cut = product_cutout(photo)
        if cut is None:
            continue
        rng = np.random.default_rng(seed)
        for _ in range(views):
            made.append(product_on_room_patch(cut, backgrounds, rng, side))
            owners.append(i)
    seen = embedder.embed_decoded(made) if made else None
    out = np.full((len(photos), embedder.dim), np.nan, dtype=np.float32)
    owners_arr = np.array(owners)
    for i in np.unique(owners_arr):
        out[i] = seen[owners_arr == i].mean(axis=0)
    return out


def with_room_views(vectors: np.ndarray, means: np.ndarray, clean_weight: float) -> np.ndarray:
    """Gallery vectors that also know the product in a room: ``clean_weight`` x the photo's own
    unit vector + the mean of its room views (:func:`room_view_means`), normalised; a photo
    with no views (NaN) keeps its vector."""
    out = np.array(vectors, dtype=np.float32, copy=True)
    has = ~np.isnan(means).any(axis=1)
    if has.any():
        out[has] = l2_normalise(clean_weight * out[has] + means[has])
    return out


def _photo_seed(data: bytes) -> int:
    """A photo's views depend on its bytes only (not on its batch or its place in the listing)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little")


# --- the gallery ------------------------------------------------------------------------------
class Gallery:
    """A search index whose products carry a detector class ("" = any) and the id to report."""

    def __init__(self, index, settings: Settings, flip: bool = False):
        self.index = index
        self.settings = settings
        self.flip = flip
        # The same products embedded by identify_fallback_embedding (whole-photo objects), or None.
        self.fallback: Gallery | None = None
        self.ids = np.array(sorted(index.products), dtype=np.int64)
        classes = settings.identify_category_classes or {}
        self.classes = {}
        self.refs = {}
        for pid, p in index.products.items():
            cls = p.get("class")
            if cls is None:  # the shop's category, by id, else by name
                for key in ("category", "category_name"):
                    if p.get(key) is not None and str(p[key]) in classes:
                        cls = classes[str(p[key])]
                        break
            # "sofa bed,couch": a product may be several classes; "" (or none) matches any.
            names = {c.strip() for c in (cls or "").split(",")}
            self.classes[pid] = frozenset() if "" in names else frozenset(names)
            self.refs[pid] = p.get("ref", pid)

    @property
    def embedder(self) -> Embedder:
        return self.index.embedder

    def crop_embedder(self, size: int) -> Embedder:
        """The gallery's embedder with its input at ``size`` px (0: its own): the same weights
        and projection, built once per size."""
        if not size or size == self.embedder.image_size:
            return self.embedder
        cache = self.__dict__.setdefault("_crop_embedders", {})
        if size not in cache:
            cache[size] = dataclasses.replace(self.embedder, image_size=size, _model=None)
        return cache[size]

    def searchable(self) -> frozenset[str] | None:
        """The classes an object can be found among products of; None when a classless product
        matches every object."""
        if any(not c for c in self.classes.values()):
            return None
        return frozenset().union(*self.classes.values())

    def allowed(self, label: str | None) -> set[int] | None:
        """Products an object of ``label`` may be: that class and the classless; None = all."""
        if label is None:
            return None
        return {pid for pid, c in self.classes.items() if not c or label in c}

    def _class_prototypes(self, label: str | None):
        """(product ids, their unit prototype vectors) an object of ``label`` may be, cached per
        class; None when the index does not keep one vector per product."""
        if self.index.aggregation != "prototype":
            return None
        cache = self.__dict__.setdefault("_by_class", {})
        if label not in cache:
            ids, protos, _ = self.index._product_prototypes()
            allowed = self.allowed(label)
            rows = np.arange(len(ids)) if allowed is None else \
                np.flatnonzero(np.isin(ids, np.fromiter(allowed, np.int64, len(allowed))))
            cache[label] = (ids[rows], np.ascontiguousarray(protos[rows], dtype=np.float32))
        return cache[label]

    def search(self, vector: np.ndarray, label: str | None, k: int) -> list[tuple[object, float]]:
        """Top-k (reported product id, score) for one embedding, restricted to ``label``."""
        restricted = self._class_prototypes(label)
        if restricted is not None and len(restricted[0]) <= EXACT_SEARCH_LIMIT:
            # Exact cosine over the class's products only: one small product, no ANN round trips.
            ids, protos = restricted
            scores = protos @ l2_normalise(np.asarray(vector, np.float32)[None])[0]
            order = np.argsort(-scores, kind="stable")[:k]
            return [(self.refs[int(ids[j])], float(scores[j])) for j in order]
        allowed = self.allowed(label)
        total = len(self.ids)
        want = min(total, k if allowed is None else max(4 * k, 32))
        while True:
            hits = self.index.search_vectors(vector, want)[0]
            kept = [h for h in hits if allowed is None or h.product_id in allowed]
            if len(kept) >= k or want >= total:
                break
            want = min(total, want * 4)
        return [(self.refs[h.product_id], h.score) for h in kept[:k]]

    # --- from a listing -----------------------------------------------------------------------
    @classmethod
    def from_index(cls, index, settings: Settings | None = None) -> "Gallery":
        return cls(index, settings or Settings())

    @classmethod
    def from_listing(cls, listing: str | Path, settings: Settings | None = None,
                     cache_dir: str | Path | None = None) -> "Gallery":
        """The gallery of a ``path,product_id,class`` CSV (paths relative to the CSV's folder),
        from the cache when this listing was indexed with this embedding before."""
        from modeling.search_index import SearchIndex

        settings = settings or Settings()
        if settings.identify_fallback_embedding:  # a second index of the same photos
            own = cls.from_listing(listing, settings.with_overrides(
                identify_fallback_embedding=""), cache_dir)
            own.fallback = cls.from_listing(listing, settings.with_overrides(
                identify_embedding=settings.identify_fallback_embedding,
                identify_fallback_embedding=""), cache_dir)
            own.settings = settings
            return own
        rows = read_listing(listing)
        cache = Path(cache_dir or settings.identify_cache_dir).expanduser()
        # The gallery and the crops run the frozen network kept beside the galleries (made once):
        # no Keras build per command, and about half the time per crop on one core.
        embedder = identify_embedder(settings).cache_network(cache / NETWORK_CACHE)
        backgrounds = gallery_backgrounds(settings)
        key = gallery_key(rows, embedder, settings, backgrounds)
        root = cache / f"gallery-{key[:24]}"
        if (root / "index.json").is_file():
            return cls(_for_queries(SearchIndex.load(root, settings), cache), settings,
                       settings.identify_flip)
        index = SearchIndex(embedder, aggregation="prototype")
        ids: dict[str, int] = {}
        products = []
        for r in rows:
            if r["product_id"] not in ids:
                ids[r["product_id"]] = len(ids) + 1
                products.append({"product_id": ids[r["product_id"]], "name": r["product_id"],
                                 "ref": r["product_id"], "class": r["class"]})
        index.add_products(products)
        try:
            rooms = load_backgrounds(backgrounds) if backgrounds else []
        except images.UnreadableImage as exc:
            raise IdentifyError(f"identify_gallery_backgrounds: {exc}") from None
        batch = 32
        with progress(total=len(rows), desc="identify: indexing the gallery", unit="photos") as bar:
            for start in range(0, len(rows), batch):
                bar.advance(_add_batch(index, embedder, rows[start:start + batch], ids, listing,
                                       settings, rooms))
        # Built beside the cache entry and renamed into place: a crash leaves no half entry.
        tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        index.save(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process cached the same gallery first: use it
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(_for_queries(SearchIndex.load(root, settings), cache), settings,
                   settings.identify_flip)


def _for_queries(index, cache: Path):
    index.embedder.cache_network(cache / NETWORK_CACHE)
    return index


def identify_embedder(settings: Settings) -> Embedder:
    """The embedder a listing's gallery (and so its crops) is embedded with."""
    if settings.identify_embedding:
        from shoplens.vision.embedding import EmbeddingError

        try:
            return Embedder.load(Path(settings.identify_embedding).expanduser(), settings)
        except EmbeddingError as exc:
            raise IdentifyError(f"identify_embedding: {exc}") from None
    return Embedder(settings.identify_backbone, settings.identify_image_size, settings=settings)


def _add_batch(index, embedder: Embedder, part: list[dict], ids: dict, listing, settings,
               rooms: list[Image.Image]) -> int:
    decoded, seeds = [], []
    for r in part:
        try:
            data = images.read_file(r["file"])
            decoded.append(images.decode(data, r["path"]))
        except images.UnreadableImage as exc:
            raise IdentifyError(f"{listing}:{r['line']}: {exc}") from None
        seeds.append(_photo_seed(data))
    photos = [trimmed_to_product(img) for img in decoded] if settings.identify_trim_gallery \
        else decoded
    vectors = embed_images(embedder, photos, settings.identify_flip)
    if rooms:
        vectors = with_room_views(vectors, room_view_means(
            embedder, decoded, seeds, rooms, settings.identify_gallery_room_views),
            settings.identify_gallery_clean_weight)
    index.add_vectors(vectors, [ids[r["product_id"]] for r in part],
                      [f'{r["product_id"]}|{r["file"]}' for r in part])
    return len(part)


def read_listing(listing: str | Path) -> list[dict]:
    """Rows {path, file, product_id, class, line} of a ``path,product_id,class`` CSV; raises
    :class:`IdentifyError` naming the line for anything unusable."""
    listing = Path(listing)
    try:
        text = listing.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentifyError(f"cannot read gallery listing {listing}: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in ("path", "product_id") if c not in header]
    if missing:
        raise IdentifyError(f"{listing}: the header must name the columns path,product_id,class "
                            f"(missing: {', '.join(missing)})")
    reader.fieldnames = header
    rows, classes_of, seen = [], {}, set()
    for n, raw in enumerate(reader, 2):
        path = (raw.get("path") or "").strip()
        pid = (raw.get("product_id") or "").strip()
        cls = (raw.get("class") or "").strip()
        if not path and not pid:
            continue
        if not path or not pid:
            raise IdentifyError(f"{listing}:{n}: path and product_id are both required")
        if cls and cls not in COCO_CLASSES:
            raise IdentifyError(f"{listing}:{n}: class {cls!r} is not a COCO class the detector "
                                "knows (empty = any)")
        classes_of.setdefault(pid, set()).add(cls)
        file = Path(path) if Path(path).is_absolute() else listing.parent / path
        if not file.is_file():
            raise IdentifyError(f"{listing}:{n}: photo {path} not found")
        if (pid, str(file.resolve())) in seen:  # the same photo of the same product again
            continue
        seen.add((pid, str(file.resolve())))
        rows.append({"path": path, "file": str(file.resolve()), "product_id": pid, "class": cls,
                     "line": n})
    if not rows:
        raise IdentifyError(f"{listing}: no gallery photos listed")
    # A product listed under several classes (a sofa bed: "bed" and "couch") is each of them;
    # listed once without a class, it matches any object.
    for r in rows:
        names = classes_of[r["product_id"]]
        r["class"] = "" if "" in names else ",".join(sorted(names))
    return rows


def _head_digest(embedder: Embedder) -> str | None:
    if embedder.head is None:
        return None
    h = hashlib.sha256(embedder.head["kernel"].tobytes())
    h.update(embedder.head["bias"].tobytes())
    return h.hexdigest()


def _file_entry(path) -> list:
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def gallery_key(rows: list[dict], embedder: Embedder, settings: Settings,
                backgrounds: list[Path] = ()) -> str:
    """What a cached gallery depends on: the rows, each photo's size and mtime, the embedding,
    and the room views (their backgrounds' files, count and weight) when on."""
    entries = [[r["file"], r["product_id"], r["class"], *_file_entry(r["file"])[1:]] for r in rows]
    rooms = None if not backgrounds else {
        "views": settings.identify_gallery_room_views,
        "clean_weight": settings.identify_gallery_clean_weight,
        "backgrounds": [_file_entry(p) for p in backgrounds]}
    config = {"format": GALLERY_CACHE_FORMAT, "backbone": embedder.backbone,
              "image_size": embedder.image_size, "weights": settings.model_init,
              "trim": settings.identify_trim_gallery, "flip": settings.identify_flip,
              "head": _head_digest(embedder), "rows": entries}
    if rooms:  # only then: galleries cached before room views existed keep their keys
        config["room_views"] = rooms
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# --- the entry point --------------------------------------------------------------------------
def identify(image: Image.Image, gallery: Gallery, detector: Detector | None,
             settings: Settings | None = None, k: int | None = None,
             full_size: tuple[int, int] | None = None) -> list[dict]:
    """Every object of an upright RGB photo with its top-k gallery products::

        [{"box": [x0, y0, x1, y1], "class": "chair", "score": 0.83,
          "top": [{"product_id": ..., "score": 0.71}, ...]}, ...]

    Boxes in image pixels (1 decimal), scores rounded to 4 decimals. ``detector`` None skips
    detection (the whole-image object only). ``full_size``: the photo's (width, height) when
    ``image`` was decoded smaller (:func:`decode_for_identify`); boxes are then in its pixels."""
    return [{"box": [round(c, 1) for c in o.box], "class": o.label,
             "score": None if o.score is None else round(o.score, 4),
             "top": [{"product_id": pid, "score": round(float(s), 4)} for pid, s in top]}
            for o, top in identify_objects(image, gallery, detector, settings, k, full_size)]


def identify_objects(image: Image.Image, gallery: Gallery, detector: Detector | None,
                     settings: Settings | None = None, k: int | None = None,
                     full_size: tuple[int, int] | None = None
                     ) -> list[tuple[DetectedBox, list[tuple[object, float]]]]:
    """:func:`identify`'s answer unrounded: (object, [(product id, score), ...]) best first."""
    answers = _identify_decoded(image, gallery, detector, settings, k)
    if full_size is None or tuple(full_size) == image.size:
        return answers
    # Detected and cropped on the reduced decode; reported in the full photo's pixels.
    sx, sy = full_size[0] / image.width, full_size[1] / image.height
    return [(dataclasses.replace(o, x0=o.x0 * sx, y0=o.y0 * sy, x1=o.x1 * sx, y1=o.y1 * sy), top)
            for o, top in answers]


def _identify_decoded(image: Image.Image, gallery: Gallery, detector: Detector | None,
                      settings: Settings | None, k: int | None
                      ) -> list[tuple[DetectedBox, list[tuple[object, float]]]]:
    settings = settings or gallery.settings
    k = k or settings.identify_top
    searchable = gallery.searchable()
    objects = detect_objects(image, detector, settings, searchable) \
        if detector is not None else []
    found = {o.label for o in objects}
    missing = [c for c in check_classes(settings.identify_fallback_classes)
               if c not in found and (searchable is None or c in searchable)] \
        if detector is not None else []
    if not objects:
        objects = [whole_image(image)]
    fallback = gallery.fallback or gallery
    vectors, whole = _embed_objects(image, objects, gallery, settings,
                                    fallback.embedder if missing else None)
    answers = [(o, gallery.search(v, o.label, k)) for o, v in zip(objects, vectors)]
    for c in missing:  # a class with no box: the whole photo, searched within the class
        answers.append((DetectedBox(0.0, 0.0, float(image.width), float(image.height), c, None),
                        fallback.search(whole, c, k)))
    return answers


def _shares_backbone(a: Embedder, b: Embedder) -> bool:
    """Whether two embedders compute the same backbone features (they differ at most in the
    projection after it), so one backbone pass serves both."""
    return (a.backbone, a.image_size, a.pooling, a.tuned_blocks, a.weights_file, a.flip_tta,
            a.part_weights) == \
        (b.backbone, b.image_size, b.pooling, b.tuned_blocks, b.weights_file, b.flip_tta,
         b.part_weights)


def _embed_objects(image: Image.Image, objects: list[DetectedBox], gallery: Gallery,
                   settings: Settings, whole_with: Embedder | None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """The objects' embeddings and, with ``whole_with``, the whole photo's by that embedder.
    Crops (and the whole photo, when ``whole_with`` shares the backbone) go through the
    backbone in ONE batch: one call, whatever the number of objects."""
    embedder = gallery.crop_embedder(settings.identify_crop_size)
    whole = None
    if settings.identify_pooling == "roi" and objects[0].label is not None:
        # One backbone pass over the whole photo; each box pooled from its feature map.
        vectors = embedder.project(roi_features(
            embedder, image, [o.box for o in objects], settings.identify_roi_size))
    else:
        # Each square cut and scaled in one resampling to what the embedder fits its input to.
        side = images.margin_size(embedder.image_size)
        crops = [square_crop(image, o.box, settings.identify_margin, side)
                 if o.label is not None else image for o in objects]
        if whole_with is not None and not gallery.flip and _shares_backbone(embedder, whole_with):
            if objects[0].label is None:  # nothing detected: the photo is already in the batch
                feats = embedder.features(embedder.centre_crops(embedder.squares(crops)))
                return embedder.project(feats), whole_with.project(feats[:1])[0]
            feats = embedder.features(embedder.centre_crops(embedder.squares([*crops, image])))
            return embedder.project(feats[:-1]), whole_with.project(feats[-1:])[0]
        vectors = embed_images(embedder, crops, gallery.flip)
    if whole_with is not None:
        whole = embed_images(whole_with, [image], gallery.flip)[0]
    return vectors, whole
