"""The FastAPI app behind the shoplens page, rendered server-side from the manifest.

Mounted by the Airflow api-server under ``/shoplens`` (see ``plugins/shoplens_plugin.py``),
where every route requires an Airflow login (the UI's JWT cookie). It also runs on its own for
development: ``uvicorn --factory shoplens_ui.app:standalone_app`` with ``plugins/`` on the path.

    /                 dataset versions, counts per split and product, latest rejections,
                      current model and its history, diff of the last two versions, recent runs
    /runs/{run_key}   one run's report: the run summary (shoplens.summary: stages with durations
                      and volumes, crawl, dedup, filter, dataset version, training), that run's
                      rejections with thumbnails
    /runs/{run_key}/filter-report      the HTML report the filter stage stored for that run
    /models/{model_id}/report/[file]   a model's evaluation report (index.html and its images)
    /thumb/{sha256}   a bounded-size JPEG thumbnail of a stored photo

Reports are read from the object store by the app and streamed back, so they are one click away
wherever the Airflow UI is, with no presigned URL to a store the browser may not reach. Only keys
the manifest names are served: the filter run's recorded report key, and a fixed list of report
files under a completed model's artefact prefix.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Callable, Iterator

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from minio.error import S3Error

from shoplens import summary as run_summary
from shoplens.config import Settings
from shoplens.manifest import ManifestNotMigrated, engine_for, require_migrated
from shoplens.store import ObjectStore
from shoplens_ui import queries
from shoplens_ui.thumbnails import ThumbnailError, clamp_side, thumbnail_from_store

log = logging.getLogger("shoplens.ui")

SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What modeling.evaluate.write_report writes under <artefact prefix>report/.
MODEL_REPORT_FILES = {"index.html": "text/html; charset=utf-8", "confusion.png": "image/png",
                      "mistakes.png": "image/png", "learning_curves.png": "image/png",
                      "per_product.json": "application/json"}
# The reports are self-contained pages: they may show their own and inline images, nothing else.
REPORT_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
ICON = Path(__file__).with_name("icon.svg")
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                        autoescape=select_autoescape(["html"]))


def _fmt_seconds(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value / 60:.1f} min" if value >= 120 else f"{value:.1f} s"


def _fmt_pct(value) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}%"


TEMPLATES.filters["seconds"] = _fmt_seconds
TEMPLATES.filters["pct"] = _fmt_pct


def _stream_object(settings: Settings, key: str, media_type: str) -> StreamingResponse:
    """The object's bytes in chunks; a missing object is a 404 before anything is sent."""
    store = ObjectStore(settings)
    try:
        obj = store.client.get_object(store.bucket, key)
    except S3Error as exc:
        log.error("report %s: object store refused: %s", key, exc)
        raise HTTPException(404 if exc.code in ("NoSuchKey", "NoSuchObject") else 502,
                            f"object store: {exc.code}") from exc

    def chunks():
        try:
            yield from obj.stream(64 * 1024)
        finally:
            obj.close()
            obj.release_conn()

    return StreamingResponse(chunks(), media_type=media_type,
                             headers={"Content-Security-Policy": REPORT_CSP,
                                      "Cache-Control": "private, max-age=300"})


@contextlib.contextmanager
def migrated_manifest(settings: Settings) -> Iterator[sa.Connection]:
    """A manifest connection; ManifestNotMigrated before the first migration (every table the
    page reads exists after it)."""
    with engine_for(settings.manifest_url).connect() as conn:
        require_migrated(conn)
        yield conn


def _airflow_login() -> list:
    from airflow.api_fastapi.core_api.security import get_user

    return [Depends(get_user)]


def create_app(settings_factory: Callable[[], Settings] = Settings.from_env,
               require_login: bool = True) -> FastAPI:
    """The page's app; ``require_login`` adds Airflow's authentication to every route."""
    app = FastAPI(title="shoplens", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=_airflow_login() if require_login else [])

    @app.exception_handler(ManifestNotMigrated)
    def not_migrated(request: Request, exc: ManifestNotMigrated) -> Response:
        return Response(f"Not ready: {exc}.", status_code=503, media_type="text/plain")

    def render(request: Request, template: str, status: int = 200, **context) -> HTMLResponse:
        context.setdefault("error", None)
        html = TEMPLATES.get_template(template).render(
            thumb=lambda sha, side=96: f"{request.url_for('thumbnail', sha256=sha).path}?side={side}",
            run_link=lambda key: request.url_for("run_report", run_key=key).path,
            filter_report_link=lambda key: request.url_for("filter_report", run_key=key).path,
            model_report_link=lambda model: request.url_for("model_report", model_id=model).path,
            home=request.url_for("overview").path, **context)
        return HTMLResponse(html, status_code=status)

    @app.get("/", response_class=HTMLResponse, name="overview")
    def overview(request: Request, version: str | None = None) -> HTMLResponse:
        settings = settings_factory()
        try:
            with migrated_manifest(settings) as conn:
                sections = {
                    "versions": queries.dataset_versions(conn),
                    "counts": queries.version_counts(conn, version),
                    "rejections": queries.rejections(conn),
                    "models": queries.model_history(conn),
                    "diff": queries.version_diff(conn),
                    "runs": queries.recent_runs(conn),
                }
        except sa.exc.OperationalError as exc:
            log.error("manifest unreachable: %s", exc)
            return render(request, "overview.html", 503, sections=None,
                          error="The manifest database is unreachable; see the api-server log.")
        except ManifestNotMigrated as exc:
            return render(request, "overview.html", 503, sections=None, error=f"Not ready: {exc}.")
        return render(request, "overview.html", sections=sections)

    @app.get("/runs/{run_key}", response_class=HTMLResponse, name="run_report")
    def run_report(request: Request, run_key: str) -> HTMLResponse:
        settings = settings_factory()
        try:
            with migrated_manifest(settings) as conn:
                summary = run_summary.load(conn, run_key)
                rejected = queries.rejections(conn, run_key=run_key)
        except sa.exc.OperationalError as exc:
            log.error("manifest unreachable: %s", exc)
            return render(request, "run.html", 503, run_key=run_key, summary=None, rejections=None,
                          error="The manifest database is unreachable; see the api-server log.")
        except ManifestNotMigrated as exc:
            return render(request, "run.html", 503, run_key=run_key, summary=None, rejections=None,
                          error=f"Not ready: {exc}.")
        return render(request, "run.html", 200 if summary.found else 404, run_key=run_key,
                      summary=summary, rejections=rejected)

    @app.get("/runs/{run_key}/filter-report", name="filter_report")
    def filter_report(run_key: str) -> StreamingResponse:
        settings = settings_factory()
        with migrated_manifest(settings) as conn:
            key = queries.filter_report_key(conn, run_key)
        if not key:
            raise HTTPException(404, "no filter report recorded for this run")
        return _stream_object(settings, key, "text/html; charset=utf-8")

    @app.get("/models/{model_id}/report/", name="model_report")
    @app.get("/models/{model_id}/report/{name}", name="model_report_file")
    def model_report(model_id: str, name: str = "index.html") -> StreamingResponse:
        if name not in MODEL_REPORT_FILES:
            raise HTTPException(404, "not a file of a model report")
        settings = settings_factory()
        with migrated_manifest(settings) as conn:
            prefix = queries.model_artifact_prefix(conn, model_id)
        if not prefix:
            raise HTTPException(404, "no completed model with this id")
        return _stream_object(settings, f"{prefix.rstrip('/')}/report/{name}",
                              MODEL_REPORT_FILES[name])

    @app.get("/thumb/{sha256}", name="thumbnail")
    def thumbnail(sha256: str, side: int = Query(96, ge=1, le=4096)) -> Response:
        if not SHA256.match(sha256):
            raise HTTPException(404, "not a sha256")
        settings = settings_factory()
        with migrated_manifest(settings) as conn:
            found = queries.image_object_key(conn, sha256)
        if found is None:
            raise HTTPException(404, "no such image in the manifest")
        key, size = found
        try:
            data = thumbnail_from_store(ObjectStore(settings), key, size, clamp_side(side),
                                        settings.max_image_bytes, settings.max_image_pixels)
        except ThumbnailError as exc:
            raise HTTPException(422, str(exc)) from exc
        except S3Error as exc:
            log.error("thumbnail %s: object store refused %s: %s", sha256, key, exc)
            raise HTTPException(404 if exc.code in ("NoSuchKey", "NoSuchObject") else 502,
                                f"object store: {exc.code}") from exc
        # Content-addressed: the bytes behind a sha256 never change.
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=604800, immutable"})

    @app.get("/icon.svg", name="icon")
    def icon() -> Response:
        return Response(ICON.read_bytes(), media_type="image/svg+xml",
                        headers={"Cache-Control": "private, max-age=86400"})

    return app


def standalone_app() -> FastAPI:
    """For ``uvicorn --factory``: the page without Airflow's login, for local development."""
    return create_app(require_login=False)
