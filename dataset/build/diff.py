"""``shoplens diff V1 V2`` (alias ``python -m dataset diff``): what changed from one dataset version to another.

Images added, removed, relabelled and moved between splits; products (labels) added and dropped;
per-label and per-split count changes. Reads only the manifest's member snapshots, so any two
versions can be compared, not just a version and its parent.
"""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from dataset.build.splits import SPLITS
from shoplens.cli import argument_parser, command, emit, parse_args
from shoplens.config import Settings
from shoplens.manifest import engine_for

MEMBER_PAIRS_SQL = sa.text("""
    SELECT coalesce(a.sha256, b.sha256) AS sha256,
           a.label AS old_label, b.label AS new_label,
           a.split AS old_split, b.split AS new_split
    FROM (SELECT * FROM dataset_members WHERE version_id = :v1) a
    FULL JOIN (SELECT * FROM dataset_members WHERE version_id = :v2) b ON a.sha256 = b.sha256
    WHERE a.sha256 IS NULL OR b.sha256 IS NULL OR a.label <> b.label OR a.split <> b.split
    ORDER BY 1
""")

LABEL_COUNTS_SQL = sa.text("""
    SELECT coalesce(a.label, b.label) AS label,
           coalesce(b.product_id, a.product_id) AS product_id,
           coalesce(b.product_name, a.product_name) AS product_name,
           coalesce(a.images, 0) AS before, coalesce(b.images, 0) AS after,
           a.label IS NULL AS added, b.label IS NULL AS dropped
    FROM (SELECT * FROM dataset_version_label_counts WHERE version_id = :v1) a
    FULL JOIN (SELECT * FROM dataset_version_label_counts WHERE version_id = :v2) b
      ON a.label = b.label
    ORDER BY 1
""")

SPLIT_COUNTS_SQL = sa.text("""
    SELECT version_id, split, count(*) AS images FROM dataset_members
    WHERE version_id IN (:v1, :v2) GROUP BY version_id, split
""")


class UnknownVersion(LookupError):
    pass


def diff_versions(settings: Settings, v1: str, v2: str) -> dict[str, Any]:
    with engine_for(settings.manifest_url).connect() as conn:
        known = set(conn.execute(sa.text(
            "SELECT version_id FROM dataset_versions WHERE version_id IN (:a, :b)"),
            {"a": v1, "b": v2}).scalars())
        for v in (v1, v2):
            if v not in known:
                raise UnknownVersion(f"no dataset version {v!r} in the manifest")
        pairs = conn.execute(MEMBER_PAIRS_SQL, {"v1": v1, "v2": v2}).mappings().all()
        labels = conn.execute(LABEL_COUNTS_SQL, {"v1": v1, "v2": v2}).mappings().all()
        split_rows = conn.execute(SPLIT_COUNTS_SQL, {"v1": v1, "v2": v2}).all()

    result: dict[str, Any] = {"from": v1, "to": v2, "images_added": [], "images_removed": [],
                              "relabelled": [], "moved": []}
    for p in pairs:
        sha = p["sha256"].strip()
        if p["old_label"] is None:
            result["images_added"].append(sha)
        elif p["new_label"] is None:
            result["images_removed"].append(sha)
        else:
            if p["old_label"] != p["new_label"]:
                result["relabelled"].append({"sha256": sha, "from": p["old_label"],
                                             "to": p["new_label"]})
            if p["old_split"] != p["new_split"]:
                result["moved"].append({"sha256": sha, "from": p["old_split"],
                                        "to": p["new_split"]})

    def product(row):
        return {"label": row["label"], "product_id": int(row["product_id"]),
                "name": row["product_name"]}

    result["products_added"] = [product(r) for r in labels if r["added"]]
    result["products_dropped"] = [product(r) for r in labels if r["dropped"]]
    result["label_count_changes"] = [
        {**product(r), "before": int(r["before"]), "after": int(r["after"]),
         "delta": int(r["after"]) - int(r["before"])}
        for r in labels if r["before"] != r["after"]]
    counts = {(v, s): int(n) for v, s, n in split_rows}
    result["split_counts"] = {
        s: {"before": counts.get((v1, s), 0), "after": counts.get((v2, s), 0)} for s in SPLITS}
    return result


def format_diff(d: dict[str, Any], limit: int = 20) -> str:
    lines = [f"dataset diff {d['from']} -> {d['to']}"]
    for s, c in d["split_counts"].items():
        lines.append(f"  {s:<5} {c['before']:>7} -> {c['after']:<7} ({c['after'] - c['before']:+d})")

    def listing(title, items, render):
        lines.append(f"{title}: {len(items)}")
        for item in items[:limit]:
            lines.append(f"  {render(item)}")
        if len(items) > limit:
            lines.append(f"  ... {len(items) - limit} more (use --json for all)")

    listing("images added", d["images_added"], str)
    listing("images removed", d["images_removed"], str)
    listing("relabelled", d["relabelled"], lambda r: f"{r['sha256']} label {r['from']} -> {r['to']}")
    listing("moved between splits", d["moved"], lambda r: f"{r['sha256']} {r['from']} -> {r['to']}")
    listing("products added", d["products_added"],
            lambda p: f"label {p['label']}: product {p['product_id']} {p['name']}")
    listing("products dropped", d["products_dropped"],
            lambda p: f"label {p['label']}: product {p['product_id']} {p['name']} (label reserved)")
    listing("per-label count changes", d["label_count_changes"],
            lambda c: f"label {c['label']} ({c['name']}): {c['before']} -> {c['after']} ({c['delta']:+d})")
    return "\n".join(lines)


@command(bad_input=(UnknownVersion,))
def main(argv: list[str] | None = None) -> int:
    """Compare two dataset versions: images added, removed, relabelled, moved; products"""
    parser = argument_parser("python -m dataset diff", __doc__.split("\n\n")[0])
    parser.add_argument("v1", help="older version, e.g. v0001")
    parser.add_argument("v2", help="newer version, e.g. v0002")
    parser.add_argument("--limit", type=int, default=20, help="items listed per section (text output)")
    args = parse_args(parser, argv)
    emit(diff_versions(Settings.from_env(), args.v1, args.v2), lambda d: format_diff(d, args.limit))
    return 0
