"""The UI as a person uses it, in headless Chromium (Debian's, driven by Playwright).

1. The shoplens page served by uvicorn from a known manifest: sections, loaded thumbnails, a
   screenshot.
2. The real Airflow UI (e2e): log in, open the nightly DAG, trigger it through the trigger form
   with edited Params (two categories, best 5), watch the run to success, open the run report
   linked from a task log, then open the shoplens page from the navigation and check it shows
   what the manifest holds, with a screenshot.

Screenshots are kept in results/ui/ (git-ignored) for a person to look at.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import sqlalchemy as sa

from shoplens.dev.services import free_port_block, wait_for_port
from shoplens.store import ObjectStore
from playwright.sync_api import TimeoutError as PlaywrightTimeout

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))
import ui_manifest  # noqa: E402

SHOTS = REPO / "results" / "ui"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                     args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page_server(manifest_url, s3_settings):
    """The page app on a real uvicorn (no Airflow login), over the seeded manifest and store."""
    import uvicorn
    from fastapi import FastAPI

    from shoplens_ui.app import create_app

    settings = s3_settings.with_overrides(manifest_url=manifest_url)
    ui_manifest.seed(manifest_url, ObjectStore(settings))
    root = FastAPI()
    root.mount("/shoplens", create_app(lambda: settings, require_login=False))
    port = free_port_block(1)
    server = uvicorn.Server(uvicorn.Config(root, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port, 30)
    yield f"http://127.0.0.1:{port}/shoplens/"
    server.should_exit = True
    thread.join(10)


def _broken_images(images) -> list[str]:
    """The src of every image (a Playwright locator of <img>) that does not show a picture.

    The sample thumbnails are lazy: each is loaded now and waited for until it has loaded or
    failed (30 s at most), so that a thumbnail still on its way is not taken for a broken one."""
    return images.evaluate_all("""imgs =>
        Promise.all(imgs.map(i => {
            i.loading = "eager";
            return i.complete ? null : new Promise(done => {
                i.addEventListener("load", done, {once: true});
                i.addEventListener("error", done, {once: true});
                setTimeout(done, 30000);
            });
        })).then(() => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src))""")


def _screenshot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 30_000, "a page with tables and photos is not a blank image"
    return path


def test_page_in_a_browser_shows_every_section_with_loaded_thumbnails(browser, page_server):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(page_server)
    page.wait_for_load_state("networkidle")
    assert page.locator("h1").inner_text() == "shoplens: datasets, rejections and models"
    headings = page.locator("h2").all_inner_texts()
    assert headings == ["Dataset versions", "Latest filter run: rejections by reason", "Current model",
                        "Diff between the last two versions", "Recent nightly runs"]
    thumbs = page.locator(".thumbs img")
    assert thumbs.count() == 6  # 3 + 2 + 1 rejected samples
    assert _broken_images(page.locator("img")) == []
    assert page.locator(".thumbs img").first.evaluate("i => i.naturalWidth") == 96
    assert "Top-1 78.0%" in page.locator("#model ~ p").first.inner_text()
    _screenshot(page, "shoplens_page_standalone.png")
    # a version link and a run link lead to their views
    page.get_by_role("link", name="v0001").click()
    assert page.locator("#counts").inner_text() == "Photos per split and product in v0001"
    page.get_by_role("link", name=ui_manifest.NIGHT1).click()
    page.wait_for_load_state("networkidle")
    assert page.locator("h1").inner_text() == f"Run report: {ui_manifest.NIGHT1}"
    assert _broken_images(page.locator("img")) == []


# --------------------------------------------------------------------------------------------
# The real Airflow UI
# --------------------------------------------------------------------------------------------
CATEGORIES = ["10120000", "16220000"]
BEST_N = 5


@pytest.fixture
def airflow_ui(tmp_path, replica_settings):
    from tests.airflow_e2e import drop_database, stack_for
    from tests.conftest import shared_path

    model = shared_path("models", "yolox_nano.onnx")  # the filter stage needs the detector
    settings = replica_settings
    stack = stack_for(tmp_path / "airflow", settings, model)
    try:
        stack.start(workers={"worker-1": "default,training"})
        yield stack, settings
    finally:
        stack.stop()
        drop_database(stack.db_url)


def _log_in(page, stack) -> None:
    page.goto(stack.api_url + "/")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(stack.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(stack.api_url + "/")


def _wait_for_run(stack, run_id: str, timeout: float = 900) -> str:
    return stack.wait_for_run("shoplens_nightly", run_id, timeout)


@pytest.mark.e2e
@pytest.mark.shared
def test_trigger_from_the_ui_then_read_the_report_and_the_shoplens_page(browser, airflow_ui):
    stack, settings = airflow_ui
    stack.wait_for_dag("shoplens_nightly")
    # one context, so that a second tab (the report) shares the login cookie
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    # the plugin's routes are behind Airflow's login
    assert page.request.get(stack.api_url + "/shoplens/").status == 401
    _log_in(page, stack)

    # --- trigger with edited Params through the trigger form
    page.goto(f"{stack.api_url}/dags/shoplens_nightly")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    # Airflow renders each Param as a form field with the id element_<param>.
    dialog.locator("#element_categories").fill("\n".join(CATEGORIES))
    dialog.get_by_label("best_n").fill(str(BEST_N))
    dialog.locator("#element_shop_base_url").fill(settings.shop_base_url)
    dialog.get_by_role("button", name="Trigger").click()
    page.wait_for_url(re.compile(r".*/dags/shoplens_nightly/runs/.+"))
    run_id = unquote(page.url.rsplit("/runs/", 1)[1])
    # Unpausing on trigger also schedules the latest interval (catchup=False); with
    # max_active_runs=1 that run would hold ours back, so it is cancelled.
    for other in stack.api("GET", "/dags/shoplens_nightly/dagRuns?limit=20")["dag_runs"]:
        if other["dag_run_id"] != run_id and other["state"] in ("queued", "running"):
            stack.api("PATCH", f"/dags/shoplens_nightly/dagRuns/{quote(other['dag_run_id'], safe='')}",
                      {"state": "failed"})
    run = stack.api("GET", f"/dags/shoplens_nightly/dagRuns/{quote(run_id, safe='')}")
    assert run["conf"]["categories"] == CATEGORIES and run["conf"]["best_n"] == BEST_N

    # --- watch it in the UI until it succeeds
    page.goto(f"{stack.api_url}/dags/shoplens_nightly/runs/{quote(run_id, safe='')}")
    assert _wait_for_run(stack, run_id) == "success", stack.logs_tail()
    page.reload()
    page.get_by_text("success", exact=False).first.wait_for(timeout=30_000)

    # --- the run report linked from the filter task's log
    # The filter stage logs the link through logging, which the log viewer shows in order
    # (a print lands in the collapsed "Post Execute" group once stdout is flushed at exit).
    log_line = page.get_by_text(re.compile(r"filter report for \S+: https?://")).first
    for attempt in range(3):  # on a busy machine the log viewer can come up empty at first
        page.goto(f"{stack.api_url}/dags/shoplens_nightly/runs/{quote(run_id, safe='')}/tasks/filter_photos")
        try:
            log_line.wait_for(timeout=40_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                SHOTS.mkdir(parents=True, exist_ok=True)  # for whoever reads the failure
                page.screenshot(path=str(SHOTS / "filter_task_log_missing.png"), full_page=True)
                raise
    report_url = re.search(r"https?://\S+", log_line.inner_text()).group(0)
    report = page.context.new_page()  # the shoplens page serves it, behind the Airflow login
    response = report.goto(report_url)
    assert response.status == 200 and "filter" in report.content().lower()

    # --- the shoplens page from the navigation, against the manifest
    page.goto(stack.api_url + "/")
    page.get_by_test_id("nav-sidebar").get_by_role("link", name="shoplens", exact=True).click()
    page.wait_for_url(stack.api_url + "/plugin/shoplens")
    frame = page.frame_locator("iframe").first
    frame.locator("h1").wait_for(timeout=30_000)
    with sa.create_engine(settings.manifest_url).connect() as conn:
        version = conn.execute(sa.text(
            "SELECT version_id, images FROM dataset_version_summary WHERE status = 'complete' "
            "ORDER BY seq DESC LIMIT 1")).mappings().one()
        rejected = conn.execute(sa.text(
            "SELECT count(DISTINCT sha256) FROM rule_decisions d JOIN filter_runs f ON f.id = d.run_id "
            "WHERE f.run_key = :k AND NOT d.passed"), {"k": run_id}).scalar_one()
    assert frame.locator("#counts").inner_text() == f"Photos per split and product in {version['version_id']}"
    assert frame.get_by_text(f"{rejected} of ").first.is_visible()
    assert frame.locator("h1").inner_text() == "shoplens: datasets, rejections and models"
    assert _broken_images(frame.locator("img")) == []
    shot = _screenshot(page, "shoplens_page_in_airflow.png")
    assert json.dumps(str(shot))
