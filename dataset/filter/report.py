"""The filter run's HTML report: counts per rule and thumbnails of rejected examples per reason.

Thumbnails are embedded as data URIs so the report is one self-contained object in the store.
"""
from __future__ import annotations

import base64
import html

from shoplens.photos import DEFAULT_LIMITS, PhotoLimits, PhotoRejected, thumbnail_jpeg

THUMB_SIDE = 160


def thumbnail_data_uri(data: bytes, limits: PhotoLimits = DEFAULT_LIMITS) -> str | None:
    """The upright photo as a small JPEG data URI; None for bytes that are not a usable photo
    (shown without a thumbnail: a bad image never fails the report)."""
    try:
        jpeg = thumbnail_jpeg(data, THUMB_SIDE, limits)
    except PhotoRejected:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def render(run_key: str, summary: dict, rule_counts: dict[str, dict[str, int]],
           examples: dict[str, list[dict]]) -> str:
    """``rule_counts``: rule -> {"passed", "rejected"}; ``examples``: rule -> [{"sha256",
    "reason", "score", "thumbnail"}] for rejected images."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(rule)}</td><td>{c.get('passed', 0)}</td><td>{c.get('rejected', 0)}</td></tr>"
        for rule, c in sorted(rule_counts.items()))
    facts = "".join(f"<li>{esc(str(k))}: {esc(str(v))}</li>" for k, v in summary.items())
    sections = []
    for rule, items in sorted(examples.items()):
        cards = []
        for item in items:
            img = (f'<img src="{item["thumbnail"]}" alt="{esc(item["sha256"])}">'
                   if item.get("thumbnail") else "<div class=missing>no thumbnail</div>")
            cards.append(f'<figure>{img}<figcaption>{esc(item["sha256"][:12])}<br>'
                         f'{esc(item.get("reason") or "")}</figcaption></figure>')
        sections.append(f'<section id="{esc(rule)}"><h2>rejected by {esc(rule)}</h2>'
                        f'{"".join(cards)}</section>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>shoplens filter run {esc(run_key)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px}} figure{{display:inline-block;margin:6px;
width:{THUMB_SIDE}px;font-size:11px;vertical-align:top}}</style></head>
<body><h1>Filter run {esc(run_key)}</h1><ul>{facts}</ul>
<table><tr><th>rule</th><th>passed</th><th>rejected</th></tr>{rows}</table>
{"".join(sections) or "<p>No image was rejected in this run.</p>"}
</body></html>
"""
