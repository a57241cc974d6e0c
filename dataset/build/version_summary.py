"""A dataset version's counts per split and per product, as Markdown for the README/run summary."""
from __future__ import annotations

import sqlalchemy as sa

from dataset.build.splits import SPLITS
from shoplens.config import Settings
from shoplens.manifest import engine_for


def readme_summary(settings: Settings, version_id: str | None = None) -> str:
    """Markdown for ``version_id`` (default: the latest complete version)."""
    with engine_for(settings.manifest_url).connect() as conn:
        if version_id is None:
            version_id = conn.execute(sa.text(
                "SELECT version_id FROM dataset_latest_version")).scalar()
            if version_id is None:
                return "No complete dataset version yet.\n"
        version = conn.execute(sa.text(
            "SELECT * FROM dataset_version_summary WHERE version_id = :v"),
            {"v": version_id}).mappings().first()
        if version is None:
            raise LookupError(f"no dataset version {version_id!r} in the manifest")
        labels = conn.execute(sa.text(
            "SELECT * FROM dataset_version_label_counts WHERE version_id = :v ORDER BY label"),
            {"v": version_id}).mappings().all()
        excluded = conn.execute(sa.text(
            "SELECT excluded_products FROM dataset_versions WHERE version_id = :v"),
            {"v": version_id}).scalar() or []

    parent = version["parent_version"] or "none"
    lines = [
        f"### Dataset version {version_id} ({version['status']}, parent {parent})",
        "",
        f"{version['uri']} - {version['images']} images, {version['labels']} labels, "
        f"created {version['created_at']:%Y-%m-%d %H:%M %Z}, code {version['code_version']}",
        "",
        "| split | images |",
        "|---|---:|",
    ]
    lines += [f"| {s} | {version[f'{s}_images']} |" for s in SPLITS]
    lines += [f"| **total** | **{version['images']}** |", "",
              "| label | product | name | category | " + " | ".join(SPLITS) + " | total |",
              "|---:|---:|---|---|" + "---:|" * (len(SPLITS) + 1)]
    for r in labels:
        name = str(r["product_name"]).replace("|", "\\|")
        lines.append(f"| {r['label']} | {r['product_id']} | {name} | {r['category_id']} | "
                     + " | ".join(str(r[f"{s}_images"]) for s in SPLITS) + f" | {r['images']} |")
    if excluded:
        lines += ["", "Left out for too few kept photos: " + ", ".join(
            f"product {e['product_id']} ({e['photos']})" for e in excluded)]
    return "\n".join(lines) + "\n"
