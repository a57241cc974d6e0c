"""``shoplens serve [--index DIR] [--port N]``: the product search over HTTP, and a page for people.

- ``GET /``: a self-contained page (no external assets: shop machines may be offline) where a
  person uploads or takes a photo; it is sent to ``/identify`` and each detected product's box is
  drawn over the photo (scaled to its displayed size); clicking a box shows that object's top-3
  products with score, and the catalogue thumbnail, price and shop link when the index's product
  table carries them (``thumbnail_key`` or ``thumbnail_url``, ``price``, ``url``), or "no
  confident match". Nothing detected: the whole photo's top-3; no detector (503): ``/search``.
- ``POST /search``: multipart upload (field ``photo``) -> ``{"top": [{product_id, name, score,
  ...details}], "confident", "confidence": {"rule", "value", "cut"}, "index"}`` (``confident``:
  the index's calibrated "no confident match" rule, ``modeling.search_index``). The photo goes through the one decoder
  (``shoplens.photos``) with the configured byte and pixel caps; a refused photo is a 4xx whose
  JSON says ``{"error": <reason code>, "message": <for people>}``: no file 400, empty 400, too
  many bytes or pixels (decompression bomb) 413, not an image or an unsupported format 415, a
  cut-off or corrupt image 422. The request body itself is cut off at the byte cap (plus room
  for the multipart envelope) before it is all read.
- ``POST /identify``: the same upload, caps and 4xx answers -> every product in the photo
  (:func:`modeling.identify.identify` over the served index, restricted by
  ``identify_category_classes``): ``{"image": {width, height}, "objects": [{"box": [x0, y0, x1,
  y1] (image pixels, upright), "class", "score", "confident", "top": [3 hits as /search's]}],
  "index"}``; nothing detected: one object, the whole image, ``class``/``score`` null. 503
  ``no_detector`` when no detector model is configured or loadable (``detector_model_path``).
- ``GET /thumbnails/<product_id>``: the product's catalogue image (its ``thumbnail_key`` in the
  index's product table: only those keys are served) read from the object store, as a JPEG of at
  most ``THUMBNAIL_SIDE`` px through the one photo decoder; 404 when the product has none.
- ``GET /healthz``: the loaded index (id, built_at, vectors, products).

Without ``--index`` the service answers from the manifest's current index
(``current_search_index``), downloaded into the local cache by ``modeling.catalogue_index``; at
most every ``search_reload_seconds`` a request asks the manifest whether a newer index is
complete, and if so it is downloaded, loaded and swapped in whole (the requests meanwhile keep the
previous one; a newer index that fails to load is logged and the previous one keeps serving).

With ``--index DIR`` the directory is watched: on each request ``index.json``'s identity (inode, mtime, size)
is compared with the loaded one; a changed file (``SearchIndex.save`` replaces it atomically,
last) is loaded and swapped in whole, so requests never see half of two indexes. A new index
that fails to load is logged and the previous one keeps serving.
"""

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

from shoplens.config import Settings
from shoplens.photos import PhotoLimits, PhotoRejected, decode_photo

log = logging.getLogger(__name__)
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_PORT = 8090
TOP_K = 3
# Room for the multipart envelope (boundaries, headers, the file name) around the photo bytes.
MULTIPART_OVERHEAD = 64 * 1024
# Product table fields shown on the page when present (extra keys of ``add_products``).
PRODUCT_DETAILS = ("price", "url", "thumbnail_url")
THUMBNAIL_SIDE = 160
# Decoder reason -> HTTP status for a refused photo.
REASON_STATUS = {"empty_image": 400, "image_too_large": 413, "not_image": 415,
                 "unsupported_format": 415, "wrong_content_type": 415,
                 "truncated_image": 422, "corrupt_image": 422}


class IndexHolder:
    """The search index currently served, replaced whole when the directory holds a newer one."""

    def __init__(self, root: str | Path, settings: Settings | None = None):
        from modeling.catalogue_index import load_for_queries
        from modeling.search_index import INDEX_FILE

        self.root = Path(root)
        self.settings = settings
        self._index_file = self.root / INDEX_FILE
        self._load = load_for_queries
        self._lock = threading.Lock()
        self._stamp = self._identity()
        self.index = self._load(self.root, settings)  # SearchIndexError: not an index, fail now
        self.embed_lock = threading.Lock()  # one photo at a time: the detector, a Keras fallback

    def _identity(self):
        try:
            st = os.stat(self._index_file)
        except OSError:
            return None
        # A replaced file (os.replace) has a new inode even within one mtime tick.
        return st.st_ino, st.st_mtime_ns, st.st_size

    def current(self):
        """The index to answer with: reloaded first when index.json changed."""
        stamp = self._identity()
        if stamp is None or stamp == self._stamp:
            return self.index
        with self._lock:
            if stamp != self._stamp:  # another request may have loaded it meanwhile
                try:
                    fresh = self._load(self.root, self.settings)
                except Exception as exc:  # noqa: BLE001 - keep serving the previous index
                    log.warning("new search index in %s not loaded, previous kept: %s",
                                self.root, exc)
                else:
                    self.index = fresh  # one assignment: requests see the old or the new whole
                    log.info("search index reloaded: %s vectors, built %s", len(fresh),
                             fresh.built_at)
                self._stamp = stamp  # a broken one is not retried until it changes again
        return self.index


class CurrentIndexHolder:
    """The manifest's current search index, replaced whole when a newer one is complete."""

    def __init__(self, settings: Settings, reload_seconds: float | None = None):
        from modeling import catalogue_index

        self.settings = settings
        self.reload_seconds = (settings.search_reload_seconds if reload_seconds is None
                               else reload_seconds)
        self._catalogue, self._load = catalogue_index, catalogue_index.load_for_queries
        self._lock = threading.Lock()
        self.embed_lock = threading.Lock()
        # No current index, an unreachable manifest or store: fail now, with the reason.
        self.index_id, path = catalogue_index.fetch_current(settings)
        self.index = self._load(path, settings)
        self._checked = time.monotonic()

    def current(self):
        """The index to answer with; the manifest is asked for a newer one at most every
        ``reload_seconds`` (by one request at a time: the others answer meanwhile)."""
        if time.monotonic() - self._checked < self.reload_seconds:
            return self.index
        if not self._lock.acquire(blocking=False):
            return self.index
        try:
            self._checked = time.monotonic()
            newest = self._catalogue.current_index_id(self.settings)
            if newest and newest != self.index_id:
                path = self._catalogue.download(self.settings, newest,
                                                self._catalogue.cache_dir(self.settings))
                fresh = self._load(path, self.settings)
                self.index, self.index_id = fresh, newest  # requests see the old or the new whole
                log.info("search index %s loaded: %s vectors", newest, len(fresh))
        except Exception as exc:  # noqa: BLE001 - keep serving the previous index
            log.warning("newer search index not loaded, %s kept: %s", self.index_id, exc)
        finally:
            self._lock.release()
        return self.index


FROM_SETTINGS = object()  # create_app's default detector: the configured model


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 without being read whole
    (refused from Content-Length when declared, else counted while it streams in)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, int(declared))
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, seen)

    async def _refuse(self, send, size: int):
        response = _error(413, "image_too_large",
                          f"request body {size} bytes > limit {self.max_bytes} bytes")
        await response({"type": "http"}, None, send)


def _error(status: int, reason: str, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": reason, "message": message}, status_code=status)


class DetectorHolder:
    """The detector ``POST /identify`` uses: the one given, or the configured model
    (``identify_detector_model_path``, else ``detector_model_path``) loaded on first use;
    ``reason`` says why there is none."""

    def __init__(self, settings: Settings, detector=FROM_SETTINGS):
        self.settings = settings
        self._lock = threading.Lock()
        self._loaded = detector is not FROM_SETTINGS
        self.detector = None if detector is FROM_SETTINGS else detector
        self.reason = None if self.detector is not None else "detection is turned off"

    def get(self):
        """The detector, or None (then ``reason`` says why)."""
        if self._loaded:
            return self.detector
        with self._lock:
            if not self._loaded:
                from modeling.identify import identify_detector
                from shoplens.vision.detector import DetectorError

                try:
                    self.detector = identify_detector(self.settings)
                    self.reason = None
                except DetectorError as exc:
                    self.reason = str(exc)
                    log.warning("no detector: POST /identify answers 503: %s", exc)
                self._loaded = True
        return self.detector


def create_app(index, settings: Settings | None = None, detector=FROM_SETTINGS):
    """The FastAPI app over an index directory, an ``IndexHolder`` or a ``CurrentIndexHolder``.

    ``detector``: what ``POST /identify`` detects with (anything with ``detect(image)``, as
    :class:`shoplens.vision.detector.Detector`); by default the configured model, loaded on
    first use; None turns detection off (``/identify`` answers 503, the page uses ``/search``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException

    settings = settings or Settings()
    limits = PhotoLimits.from_settings(settings)
    holder = index if isinstance(index, (IndexHolder, CurrentIndexHolder)) else \
        IndexHolder(index, settings)
    detectors = DetectorHolder(settings, detector)
    app = FastAPI(title="shoplens search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.holder = holder
    app.state.detectors = detectors
    galleries: dict = {}  # the served index -> its identify Gallery (rebuilt when it is swapped)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):  # one error shape for every 4xx
        return _error(exc.status_code, "bad_request", str(exc.detail))

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    @app.get("/healthz")
    def health():
        idx = holder.current()
        return {"status": "ok", "index": _index_summary(idx, holder)}

    @app.get("/thumbnails/{product_id}")
    async def thumbnail(product_id: int):
        from shoplens.photos import thumbnail_jpeg
        from shoplens.store import ObjectStore

        key = holder.current().products.get(product_id, {}).get("thumbnail_key")
        if not key:
            return _error(404, "no_thumbnail", f"product {product_id} has no catalogue image")

        def read():
            return thumbnail_jpeg(ObjectStore(settings).get_bytes(key), THUMBNAIL_SIDE, limits)

        try:
            data = await run_in_threadpool(read)
        except PhotoRejected as exc:
            return _error(404, exc.reason, f"product {product_id}: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - the store down: no thumbnail, the page still works
            log.warning("thumbnail of product %s not read: %s", product_id, exc)
            return _error(503, "store_unavailable", "the object store is unreachable")
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    async def uploaded_photo(request: Request, reduce_to: int | None = None):
        """(the decoded :class:`~shoplens.photos.Photo`, None) or (None, the 4xx answer);
        ``reduce_to`` as :func:`shoplens.photos.decode_photo` takes it."""
        form = await request.form(max_files=1, max_fields=8)
        photo = form.get("photo")
        if not isinstance(photo, UploadFile):
            return None, _error(400, "no_file", "no photo uploaded: send multipart/form-data "
                                "with the image in a field named 'photo'")
        data = await photo.read()
        try:
            return decode_photo(data, limits, reduce_to=reduce_to), None
        except PhotoRejected as exc:
            return None, _error(REASON_STATUS.get(exc.reason, 422), exc.reason,
                                f"{photo.filename or 'photo'}: {exc.message}")

    def with_details(idx, hit: dict) -> dict:
        product = idx.products.get(hit["product_id"], {})
        hit.setdefault("name", product.get("name", str(hit["product_id"])))
        hit.update({k: product[k] for k in PRODUCT_DETAILS if product.get(k) is not None})
        if product.get("thumbnail_key") and "thumbnail_url" not in hit:
            hit["thumbnail_url"] = f"thumbnails/{hit['product_id']}"
        return hit

    @app.post("/search")
    async def search(request: Request):
        photo, refused = await uploaded_photo(request)
        if refused is not None:
            return refused
        idx = holder.current()
        image = photo.image

        def embed():
            with holder.embed_lock:
                return idx.embedder.embed_decoded([image])[0]

        answer = idx.answer(await run_in_threadpool(embed), TOP_K)
        for hit in answer["top"]:
            with_details(idx, hit)
        return {**answer, "index": _index_summary(idx, holder)}

    @app.post("/identify")
    async def identify_objects(request: Request):
        from modeling.identify import Gallery, identify_objects

        # As the CLI reads it (identify_decode_side); boxes come back in full-size pixels.
        photo, refused = await uploaded_photo(request, settings.identify_decode_side or None)
        if refused is not None:
            return refused
        found = await run_in_threadpool(detectors.get)
        if found is None:
            return _error(503, "no_detector", "object detection is not available here "
                          f"({detectors.reason}): use POST /search for the whole photo")
        idx = holder.current()
        gallery = galleries.get(id(idx))
        if gallery is None or gallery.index is not idx:
            galleries.clear()  # only the served index's gallery is kept
            gallery = galleries[id(idx)] = Gallery.from_index(idx, settings)

        def work():
            with holder.embed_lock:  # the detector and the embedder, one photo at a time
                return identify_objects(photo.image, gallery, found, settings, TOP_K,
                                        (photo.width, photo.height))

        objects = []
        for obj, top in await run_in_threadpool(work):
            objects.append({
                "box": [round(c, 1) for c in obj.box], "class": obj.label,
                "score": None if obj.score is None else round(obj.score, 4),
                # the unrounded scores against the index's confidence rule, as /search does
                "confident": bool(top) and idx.is_confident([score for _, score in top]),
                "top": [with_details(idx, {"product_id": pid, "score": float(score)})
                        for pid, score in top]})
        return {"image": {"width": photo.width, "height": photo.height}, "objects": objects,
                "index": _index_summary(idx, holder)}

    app.add_middleware(BodyLimit, max_bytes=limits.max_bytes + MULTIPART_OVERHEAD)
    return app


def _index_summary(idx, holder=None) -> dict:
    from modeling.search_index import confidence_rule

    rule = confidence_rule(idx.threshold)
    return {"id": getattr(holder, "index_id", None), "built_at": idx.built_at,
            "vectors": len(idx), "products": len(idx.products),
            "confidence_rule": rule and rule[0]}


def parser() -> argparse.ArgumentParser:
    from shoplens.cli import argument_parser

    p = argument_parser("python -m modeling serve", main.__doc__, json_flag=False)
    p.add_argument("--index", help="search index directory (default: the manifest's current "
                   "index, and a newer one once it is complete)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Serve the product search page and POST /search over the current search index (or --index DIR; reloads a newer one)"""
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from modeling.search_index import INDEX_FILE, SearchIndexError
    from shoplens.cli import EXIT_UNREACHABLE, ServiceUnreachable

    if args.index and not (Path(args.index) / INDEX_FILE).is_file():
        print(f"error: no search index in {args.index} ({INDEX_FILE} missing): build one first "
              "(`make demo` or `shoplens index refresh`)", file=sys.stderr)
        return EXIT_BAD_INPUT
    settings = Settings.from_env()
    try:
        app = create_app(args.index or CurrentIndexHolder(settings), settings)
    except (SearchIndexError, LookupError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ServiceUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    import uvicorn

    model = Path(settings.identify_detector_model_path or settings.detector_model_path).expanduser()
    if not model.is_file():
        print(f"warning: no detector model at {model}: POST /identify answers 503 and the page "
              "searches the whole photo (`shoplens models fetch` or SHOPLENS_DETECTOR_MODEL_PATH)",
              file=sys.stderr)
    print(f"shoplens search on http://{args.host}:{args.port}/ "
          f"(index {args.index or 'current: ' + app.state.holder.index_id})",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return EXIT_OK


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>shoplens: find a product by photo</title>
<style>
 body{font-family:system-ui,sans-serif;max-width:40rem;margin:1rem auto;padding:0 1rem;color:#222}
 h1{font-size:1.3rem} label.pick{display:inline-block;padding:.7rem 1.2rem;background:#1f6feb;
 color:#fff;border-radius:.4rem;cursor:pointer} input[type=file]{display:none}
 #frame{position:relative;display:inline-block;max-width:100%;margin:1rem 0;line-height:0}
 #preview{display:block;max-width:100%;max-height:24rem}
 .box{position:absolute;box-sizing:border-box;border:3px solid #1f6feb;background:transparent;
 padding:0;cursor:pointer;border-radius:.2rem}
 .box span{position:absolute;left:-3px;top:-3px;background:#1f6feb;color:#fff;font-size:.75rem;
 line-height:1.2;padding:.1rem .3rem;white-space:nowrap}
 .box.selected{border-color:#e8590c;box-shadow:0 0 0 2px #fff}
 .box.selected span{background:#e8590c}
 ol{padding:0;list-style:none} li{display:flex;gap:.8rem;align-items:center;border:1px solid #ddd;
 border-radius:.4rem;padding:.5rem;margin:.4rem 0} li img{width:4rem;height:4rem;object-fit:cover}
 .score{color:#666;font-size:.9rem} .none{color:#a40} .error{color:#b00}
</style></head><body>
<h1>Find a product by photo</h1>
<label class="pick">Upload or take a photo
 <input id="photo" type="file" name="photo" accept="image/*" capture="environment"></label>
<div id="frame" hidden><img id="preview" alt="your photo"></div>
<p id="found" hidden></p>
<p id="status" role="status"></p>
<ol id="results"></ol>
<script>
const input = document.getElementById("photo"), status = document.getElementById("status"),
      results = document.getElementById("results"), preview = document.getElementById("preview"),
      frame = document.getElementById("frame"), found = document.getElementById("found");
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => e.setAttribute(k, v));
  if (text !== undefined) e.textContent = text;
  return e;
}
async function post(path, file) {
  const body = new FormData(); body.append("photo", file);
  const response = await fetch(path, {method: "POST", body});
  let answer = {};
  try { answer = await response.json(); } catch (err) { /* not JSON: the status says enough */ }
  return {response, answer};
}
function showTop(top, confident, what) {
  results.replaceChildren();
  status.className = confident ? "" : "none";
  status.textContent = (what ? what + ": " : "") +
    (confident ? "best matches:" : "no confident match. Closest products:");
  for (const hit of top) {
    const li = el("li", {"data-product-id": hit.product_id});
    if (hit.thumbnail_url) li.append(el("img", {src: hit.thumbnail_url, alt: ""}));
    const text = el("div");
    const name = hit.url ? el("a", {href: hit.url, rel: "noopener"}, hit.name)
                         : el("strong", {}, hit.name);
    name.className = "name"; text.append(name);
    if (hit.price !== undefined) text.append(el("div", {class: "price"},
      typeof hit.price === "number" ? hit.price.toLocaleString() : String(hit.price)));
    text.append(el("div", {class: "score"}, "score " + hit.score.toFixed(3)));
    if (hit.url) text.append(el("a", {class: "shop", href: hit.url, rel: "noopener"}, "View in shop"));
    li.append(text); results.append(li);
  }
}
function drawBoxes(answer, detected) {
  const pct = (v, total) => (100 * v / total) + "%";
  const {width, height} = answer.image;
  detected.forEach((obj, i) => {
    const [x0, y0, x1, y1] = obj.box;
    const label = (i + 1) + ". " + obj.class;
    const box = el("button", {type: "button", class: "box", "data-object": i,
                              "aria-pressed": "false", "aria-label": label + ": show its matches"});
    Object.assign(box.style, {left: pct(x0, width), top: pct(y0, height),
                              width: pct(x1 - x0, width), height: pct(y1 - y0, height)});
    box.append(el("span", {}, label));
    box.addEventListener("click", () => select(detected, i));
    frame.append(box);
  });
}
function select(detected, i) {
  frame.querySelectorAll(".box").forEach(b => {
    const on = b.dataset.object === String(i);
    b.classList.toggle("selected", on); b.setAttribute("aria-pressed", String(on));
  });
  showTop(detected[i].top, detected[i].confident, (i + 1) + ". " + detected[i].class);
}
input.addEventListener("change", async () => {
  const file = input.files[0];
  if (!file) return;
  frame.querySelectorAll(".box").forEach(b => b.remove());
  preview.src = URL.createObjectURL(file); frame.hidden = false; found.hidden = true;
  results.replaceChildren(); status.className = ""; status.textContent = "Searching\u2026";
  try {
    let {response, answer} = await post("identify", file);
    if (response.status === 503) {  // no detector here: the whole photo, as one product
      ({response, answer} = await post("search", file));
      if (!response.ok) throw new Error(answer.message || response.statusText);
      showTop(answer.top, answer.confident);
      return;
    }
    if (!response.ok) throw new Error(answer.message || response.statusText);
    const detected = answer.objects.filter(o => o.class !== null);
    if (!detected.length) {  // nothing detected: the whole-image answer
      showTop(answer.objects[0].top, answer.objects[0].confident);
      return;
    }
    drawBoxes(answer, detected);
    found.textContent = detected.length + " product" + (detected.length > 1 ? "s" : "") +
      " found in the photo: tap a box to see its matches.";
    found.hidden = false;
    select(detected, 0);
  } catch (err) {
    results.replaceChildren();
    status.className = "error"; status.textContent = "Could not search: " + err.message;
  }
});
</script></body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
