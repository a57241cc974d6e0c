"""``shoplens lineage SHA256 [--dataset-version V]`` (alias ``python -m dataset lineage``): an
image's whole story.

Backward: the dataset versions that hold it (label, split), its source URL, the review (and any
other review that posted the same bytes), the product and category, the crawl run, its dedup
cluster, every rule decision, a human override and the resulting verdict. For a crop salvaged from
a multi-product photo (``salvaged_crops``): its parent photo's story, and how it was cut out
(``salvaged_from``: box, crop rectangle, similarity, threshold, filter run); for a photo the
salvage looked at, what it decided (``salvaged_crop``).
Forward: the models trained on those versions, read from the modeling stage's ``models`` table
(``models.dataset_version``).
"""
from __future__ import annotations

import json
import re
from typing import Any

import sqlalchemy as sa

from shoplens.cli import argument_parser, command, emit, parse_args
from shoplens.config import Settings
from shoplens.manifest import engine_for

SHA_PREFIX = re.compile(r"^[0-9a-f]{8,64}$")


class LineageError(LookupError):
    pass


def _rows(conn: sa.Connection, sql: str, **params) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]


def _one(conn: sa.Connection, sql: str, **params) -> dict[str, Any] | None:
    rows = _rows(conn, sql, **params)
    return rows[0] if rows else None


def resolve_sha256(conn: sa.Connection, given: str) -> str:
    given = given.strip().lower()
    if not SHA_PREFIX.match(given):
        raise LineageError(f"{given!r} is not a sha256 (or a prefix of at least 8 hex digits)")
    matches = conn.execute(sa.text(
        "SELECT sha256 FROM images WHERE sha256 LIKE :p UNION "
        "SELECT sha256 FROM salvaged_crops WHERE sha256 LIKE :p ORDER BY sha256 LIMIT 2"),
        {"p": given + "%"}).scalars().all()
    if not matches:
        raise LineageError(f"no image or salvaged crop {given} in the manifest")
    if len(matches) > 1:
        raise LineageError(f"{given} is ambiguous: give more digits")
    return matches[0].strip()


def lineage(settings: Settings, sha256: str, version: str | None = None) -> dict[str, Any]:
    with engine_for(settings.manifest_url).connect() as conn:
        sha = resolve_sha256(conn, sha256)
        memberships = _rows(conn, """
            SELECT m.version_id, v.status, v.created_at, m.label, m.split, m.product_id,
                   m.cluster_id, v.uri
            FROM dataset_members m JOIN dataset_versions v ON v.version_id = m.version_id
            WHERE m.sha256 = :s ORDER BY v.seq""", s=sha)
        if version is not None:
            memberships = [m for m in memberships if m["version_id"] == version]
            if not memberships:
                held = _rows(conn, "SELECT version_id FROM dataset_members WHERE sha256 = :s"
                                   " ORDER BY version_id", s=sha)
                raise LineageError(f"image {sha} is not in version {version} (it is in: "
                                   f"{', '.join(h['version_id'] for h in held) or 'no version'})")
        # A crop salvaged from a multi-product photo: its story is its parent photo's, plus how
        # it was cut out (box, crop rectangle, similarity, filter run).
        crop = _one(conn, """
            SELECT c.*, f.run_key AS filter_run_key FROM salvaged_crops c
            LEFT JOIN filter_runs f ON f.id = c.run_id WHERE c.sha256 = :s""", s=sha)
        source = crop["parent_sha256"].strip() if crop else sha
        image = _one(conn, """
            SELECT sha256, object_key, size_bytes, width, height, format, source_url,
                   review_id, product_id, first_seen_run, created_at
            FROM images WHERE sha256 = :s""", s=source)
        story: dict[str, Any] = {
            "sha256": sha,
            "versions": memberships,
            "image": image,
            "review": _one(conn, """
                SELECT id, product_id, created_date, stars, writer_nickname, photo_url,
                       source_url, first_seen_run
                FROM reviews WHERE id = :r""", r=image["review_id"]),
            "also_posted_in_reviews": _rows(conn, """
                SELECT rp.review_id, rp.run_id, r.source_url FROM review_photos rp
                JOIN reviews r ON r.id = rp.review_id
                WHERE rp.sha256 = :s AND rp.review_id <> :r ORDER BY rp.review_id""",
                s=sha, r=image["review_id"]),
            "product": _one(conn, """
                SELECT p.id, p.name, p.brand, p.category_id, c.name AS category_name,
                       p.source_url
                FROM products p LEFT JOIN categories c ON c.id = p.category_id
                WHERE p.id = :p""", p=image["product_id"]),
            "crawl_run": _one(conn, """
                SELECT id, run_key, started_at, finished_at, status, shop_base_url
                FROM crawl_runs WHERE id = :r""", r=image["first_seen_run"]),
            "dedup": _one(conn, "SELECT * FROM image_dedup WHERE sha256 = :s", s=source),
            "rule_decisions": _rows(conn, """
                SELECT d.rule, d.passed, d.score, d.reason, d.rule_version, d.detector_version,
                       d.params, d.run_id, f.run_key AS filter_run_key, d.decided_at
                FROM rule_decisions d LEFT JOIN filter_runs f ON f.id = d.run_id
                WHERE d.sha256 = :s ORDER BY d.run_id, d.rule""", s=source),
            "salvaged_from": crop,
            "salvaged_crop": None if crop else _one(conn, """
                SELECT sha256, outcome, label, box, crop_box, best_score, threshold, run_id
                FROM salvaged_crops WHERE parent_sha256 = :s""", s=sha),
            "override": _one(conn, "SELECT * FROM image_overrides WHERE sha256 = :s", s=sha),
            "verdict": _one(conn, "SELECT * FROM image_verdicts WHERE sha256 = :s", s=sha),
            # Forward lineage: the models trained on any version that holds the image.
            "models": _rows(conn, "SELECT * FROM models WHERE dataset_version = ANY(:v) ORDER BY id",
                            v=[m["version_id"] for m in memberships]),
        }
    return json.loads(json.dumps(story, default=str))


@command(bad_input=(LineageError,))
def main(argv: list[str] | None = None) -> int:
    """Where an image of a dataset version came from and which models it went into"""
    parser = argument_parser("python -m dataset lineage", __doc__.split("\n\n")[0],
                             legacy_version_dest="dataset_version")
    parser.add_argument("sha256", help="the image's sha256 (or a unique prefix of >= 8 hex digits)")
    parser.add_argument("--dataset-version", dest="dataset_version", metavar="V",
                        help="only this dataset version, e.g. v0003")
    args = parse_args(parser, argv)
    emit(lineage(Settings.from_env(), args.sha256, args.dataset_version))
    return 0
