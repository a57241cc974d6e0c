"""Airflow plugin: the "shoplens" page in the Airflow 3 UI.

The api-server mounts the page's FastAPI app (``shoplens_ui.app``) under ``/shoplens``; the
external view puts it in the UI's navigation, where the UI shows it in a frame at
``/plugin/shoplens``. The page reads the manifest named by ``SHOPLENS_MANIFEST_URL`` and photos
from the object store named by the ``SHOPLENS_S3_*`` settings, and requires an Airflow login.
"""
from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from shoplens_ui.app import create_app

URL_PREFIX = "/shoplens"


class ShoplensPlugin(AirflowPlugin):
    name = "shoplens"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "shoplens"}]
    external_views = [{
        "name": "shoplens",
        "href": f"{URL_PREFIX}/",
        "url_route": "shoplens",
        "destination": "nav",
        "nav_top_level": True,
        "icon": f"{URL_PREFIX}/icon.svg",
    }]
