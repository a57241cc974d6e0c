"""The filter run's HTML report: counts per rule, thumbnails of rejected examples per reason, and
the crops salvaged from multi-product photos (each beside its parent photo with the crop drawn).

Thumbnails are embedded as data URIs so the report is one self-contained object in the store.
"""
from __future__ import annotations

import base64
import html

from PIL import ImageDraw

from shoplens.photos import (DEFAULT_LIMITS, PhotoLimits, PhotoRejected, decode_photo, encode_jpeg,
                             thumbnail_jpeg)

THUMB_SIDE = 160


def thumbnail_data_uri(data: bytes, limits: PhotoLimits = DEFAULT_LIMITS) -> str | None:
    """The upright photo as a small JPEG data URI; None for bytes that are not a usable photo
    (shown without a thumbnail: a bad image never fails the report)."""
    try:
        jpeg = thumbnail_jpeg(data, THUMB_SIDE, limits)
    except PhotoRejected:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()


def boxed_thumbnail_data_uri(data: bytes, box, limits: PhotoLimits = DEFAULT_LIMITS,
                             side: int = THUMB_SIDE) -> str | None:
    """The upright photo with ``box`` ([x0, y0, x1, y1] in its full-size pixels) drawn in red, as
    a small JPEG data URI; None for bytes that are not a usable photo."""
    try:
        photo = decode_photo(data, limits, reduce_to=side)
    except PhotoRejected:
        return None
    image = photo.image.copy()
    image.thumbnail((side, side))
    sx, sy = image.width / max(1, photo.width), image.height / max(1, photo.height)
    draw = ImageDraw.Draw(image)
    draw.rectangle([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], outline=(255, 0, 0),
                   width=3)
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(image, 80)).decode()


def render(run_key: str, summary: dict, rule_counts: dict[str, dict[str, int]],
           examples: dict[str, list[dict]], salvaged: list[dict] | None = None) -> str:
    """``rule_counts``: rule -> {"passed", "rejected"}; ``examples``: rule -> [{"sha256",
    "reason", "score", "thumbnail"}] for rejected images; ``salvaged``: [{"sha256",
    "parent_sha256", "label", "score", "runner_up", "product_id", "product_name", "crop",
    "parent"}] (``crop``/``parent``: thumbnails, the parent with the crop drawn)."""
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
    cards = []
    for item in salvaged or []:
        pics = "".join(f'<img src="{item[k]}" alt="{k}">' if item.get(k)
                       else "<div class=missing>no thumbnail</div>" for k in ("parent", "crop"))
        runner = "" if item.get("runner_up") is None else f", next product {item['runner_up']:.3f}"
        cards.append(f'<figure class=salvaged>{pics}<figcaption>crop {esc(item["sha256"][:12])} '
                     f'of {esc(item["parent_sha256"][:12])}<br>{esc(str(item.get("label")))}, '
                     f'similarity {item["score"]:.3f}{runner}<br>product {esc(str(item["product_id"]))}'
                     f' {esc(item.get("product_name") or "")}</figcaption></figure>')
    if cards:
        sections.append(f'<section id="salvaged"><h2>salvaged crops ({len(cards)} shown)</h2>'
                        f'<p>Photos rejected as multi-product whose crop (red box) matches the '
                        f'reviewed product: they enter the dataset unless overridden '
                        f'(<code>shoplens override CROP_SHA256 --reject --reason ...</code>).</p>'
                        f'{"".join(cards)}</section>')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>shoplens filter run {esc(run_key)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px}} figure{{display:inline-block;margin:6px;
width:{THUMB_SIDE}px;font-size:11px;vertical-align:top}} figure.salvaged{{width:{2 * THUMB_SIDE + 10}px}}
figure.salvaged img{{margin-right:4px;vertical-align:top}}</style></head>
<body><h1>Filter run {esc(run_key)}</h1><ul>{facts}</ul>
<table><tr><th>rule</th><th>passed</th><th>rejected</th></tr>{rows}</table>
{"".join(sections) or "<p>No image was rejected in this run.</p>"}
</body></html>
"""
