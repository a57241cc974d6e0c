"""The shoplens page's HTML and thumbnails, rendered from a real manifest and a real S3 store."""
from __future__ import annotations

import io
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from shoplens.config import Settings
from shoplens.store import ObjectStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
from shoplens_ui.app import create_app  # noqa: E402

import ui_manifest  # noqa: E402


def client_for(settings: Settings) -> TestClient:
    # Mounted under /shoplens as the api-server does, so that every link carries the prefix.
    from fastapi import FastAPI

    root = FastAPI()
    root.mount("/shoplens", create_app(lambda: settings, require_login=False))
    return TestClient(root)


@pytest.fixture
def page(manifest_url, s3_settings):
    settings = s3_settings.with_overrides(manifest_url=manifest_url)
    ui_manifest.seed(manifest_url, ObjectStore(settings))
    return client_for(settings)


def test_overview_shows_versions_counts_rejections_model_diff_and_runs(page):
    response = page.get("/shoplens/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    for text in ("v0003", "failed", "Photos per split and product in v0002", "원목 침대 프레임",
                 "도자기 그릇 세트", "too_small: <span class=\"num\">3</span> photos",
                 "5 of 24 photos rejected", "Top-1 78.0%", "Top-3 93.0%", "model <strong>m1</strong>",
                 "v0001 &rarr; v0002", "<strong>4</strong> added", "<strong>2</strong> removed",
                 "<strong>1</strong> moved between splits",
                 "Top-1 0.760 &lt; current 0.780 - margin 0.0"):  # escaped, not raw HTML
        assert text in html, text
    assert f'src="/shoplens/thumb/{ui_manifest.photo_sha(0)}?side=96"' in html
    assert f'href="/shoplens/runs/{quote(ui_manifest.NIGHT1, safe="")}"' in html \
        or f'href="/shoplens/runs/{ui_manifest.NIGHT1}"' in html


def test_a_version_can_be_picked_from_the_list(page):
    html = page.get("/shoplens/", params={"version": "v0001"}).text
    assert "Photos per split and product in v0001" in html
    assert "도자기 그릇 세트</td>" not in html.split('id="counts"')[1].split("</table>")[0]


def test_thumbnails_are_bounded_jpegs_of_the_stored_photo(page):
    sha = ui_manifest.photo_sha(3)
    small = page.get(f"/shoplens/thumb/{sha}")
    assert small.status_code == 200 and small.headers["content-type"] == "image/jpeg"
    assert "immutable" in small.headers["cache-control"]
    assert Image.open(io.BytesIO(small.content)).size == (96, 72)  # 640x480 scaled to fit 96
    huge = page.get(f"/shoplens/thumb/{sha}", params={"side": 4000})
    assert max(Image.open(io.BytesIO(huge.content)).size) == 256  # the bound, whatever is asked
    original = ui_manifest.jpeg(3)
    assert len(huge.content) < len(original) * 2


@pytest.mark.parametrize("path,status", [
    (f"/shoplens/thumb/{'ab' * 32}", 404),  # well-formed but unknown to the manifest
    ("/shoplens/thumb/not-a-hash", 404),
    (f"/shoplens/thumb/{'01' * 32}?side=0", 422),
])
def test_bad_thumbnail_requests_get_clear_errors(page, path, status):
    assert page.get(path).status_code == status


def test_a_photo_missing_from_the_store_is_a_404_not_a_crash(page, s3_settings):
    sha = ui_manifest.photo_sha(5)
    ObjectStore(s3_settings).remove(f"images/{sha[:2]}/{sha}.jpg")
    response = page.get(f"/shoplens/thumb/{sha}")
    assert response.status_code == 404 and "NoSuchKey" in response.text


def test_run_report_lists_stages_and_that_runs_rejections(page):
    response = page.get(f"/shoplens/runs/{quote(ui_manifest.NIGHT1, safe='')}")
    assert response.status_code == 200
    html = response.text
    assert f"Run report: {ui_manifest.NIGHT1}" in html
    for text in ("crawl:10120000", "95.0 s", "3.3 min", "photos_stored=18", "decided=24", "too_small"):
        assert text in html, text
    assert page.get("/shoplens/runs/manual__nonexistent").status_code == 404


def test_a_manifest_no_migration_has_run_on_is_a_503_saying_to_migrate(fresh_database):
    """Before the first migration (e.g. the page opened before any crawl) no table exists: the page
    says so once instead of failing on the first missing table."""
    client = client_for(Settings(manifest_url=fresh_database))
    for path in ("/shoplens/", "/shoplens/runs/manual__1", "/shoplens/runs/manual__1/filter-report",
                 "/shoplens/models/m1/report/", f"/shoplens/thumb/{'0' * 64}"):
        response = client.get(path)
        assert response.status_code == 503, path
        assert "never migrated" in response.text and "apply the migrations" in response.text, path


def test_an_unreachable_manifest_is_a_503_with_a_message():
    from shoplens.dev.services import free_port_block

    dead = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port_block(1)}/nothing"
    response = client_for(Settings(manifest_url=dead)).get("/shoplens/")
    assert response.status_code == 503 and "manifest database is unreachable" in response.text


def test_each_runs_filter_report_is_served_by_the_page_and_linked_from_it(page):
    """The report the filter stage stored is streamed from the object store by the app itself
    (no presigned URL), and the overview and the run page link to it."""
    link = f"/shoplens/runs/{quote(ui_manifest.NIGHT1, safe='')}/filter-report"
    for listing in ("/shoplens/", f"/shoplens/runs/{quote(ui_manifest.NIGHT1, safe='')}"):
        html = page.get(listing).text
        assert f'href="{link}"' in html or f'href="/shoplens/runs/{ui_manifest.NIGHT1}/filter-report"' in html
    report = page.get(link)
    assert report.status_code == 200
    assert report.headers["content-type"] == "text/html; charset=utf-8"
    assert report.text == ui_manifest.FILTER_REPORT
    assert "default-src 'none'" in report.headers["content-security-policy"]
    assert "X-Amz-Signature" not in page.get("/shoplens/").text


def test_each_models_evaluation_report_and_its_images_are_served_and_linked(page):
    html = page.get("/shoplens/").text
    assert 'href="/shoplens/models/m1/report/"' in html and 'href="/shoplens/models/m2/report/"' in html
    index = page.get("/shoplens/models/m1/report/")
    assert index.status_code == 200 and index.headers["content-type"] == "text/html; charset=utf-8"
    assert index.text == ui_manifest.MODEL_REPORT
    # The page's relative image link resolves next to it.
    curves = page.get("/shoplens/models/m1/report/learning_curves.png")
    assert curves.status_code == 200 and curves.headers["content-type"] == "image/png"
    assert curves.content == ui_manifest.jpeg(0, (8, 8))


@pytest.mark.parametrize("path", [
    "/shoplens/runs/manual__nonexistent/filter-report",     # no such filter run
    "/shoplens/models/m9/report/",                          # no such model
    "/shoplens/models/m2/report/",                          # known model, report not in the store
    "/shoplens/models/m1/report/ensemble.json",             # stored, but not a report file
    "/shoplens/models/m1/report/..%2Fensemble.json",        # traversal out of the report
    "/shoplens/models/..%2Fm1/report/index.html",           # traversal in the model id
    f"/shoplens/models/m1/report/{quote('../../' + ui_manifest.FILTER_REPORT_KEY, safe='')}",
])
def test_only_report_keys_named_by_the_manifest_are_served(page, path):
    response = page.get(path)
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/json"  # an error, not a stored object
