"""A small, fully known manifest for the shoplens page's tests, written with plain SQL.

Two crawl runs, three products in two categories, 24 photos (real JPEGs in the object store when
a store is given), one filter run with rejections and its stored HTML report, dataset versions
v0001 -> v0002 (complete) and v0003 (failed), two models (m1 promoted and re-evaluated on v0002,
with an evaluation report in the store; m2 not promoted), and run metrics for the first night. Every number the tests assert follows from the lists below.
"""
from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from PIL import Image

NIGHT1, NIGHT2 = "scheduled__2026-01-02T17:00:00+00:00", "scheduled__2026-01-03T17:00:00+00:00"
PRODUCTS = {101: ("원목 침대 프레임", "10120000"), 102: ("퀸 사이즈 침대", "10120000"),
            201: ("도자기 그릇 세트", "16220000")}
LABELS = {101: 0, 102: 1, 201: 2}
PHOTO_PRODUCT = [101] * 10 + [102] * 8 + [201] * 6  # photo i belongs to PHOTO_PRODUCT[i]
# Filter run of night 1: photo index -> rules it failed (the rest passed every rule).
FAILED_RULES = {0: ["too_small"], 1: ["too_small", "second_product"], 2: ["too_small"],
                12: ["second_product"], 20: ["no_detection"]}
RULES = ["too_small", "second_product", "no_detection"]
# v0001 members: photo index -> split; v0002 removes 3 and 4, adds 21-23 and 9, moves 5 to val.
V1 = {3: "train", 4: "train", 5: "train", 6: "train", 7: "val", 8: "test",
      13: "train", 14: "train", 15: "val", 16: "test", 17: "train"}
V2 = {**{k: v for k, v in V1.items() if k not in (3, 4)}, 5: "val",
      21: "train", 22: "val", 23: "test", 9: "train"}


FILTER_REPORT_KEY = f"reports/{NIGHT1}/filter.html"
FILTER_REPORT = "<!doctype html><title>filter report</title><h1>Filter report 필터</h1>"
MODEL_REPORT = '<!doctype html><h1>Model m1 모델</h1><img src="learning_curves.png">'


def photo_sha(i: int) -> str:
    return f"{i + 1:02x}" * 32


def jpeg(i: int, size: tuple[int, int] = (640, 480)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(out, "JPEG")
    return out.getvalue()


def seed(url: str, store=None) -> None:
    """Write the whole scenario; with ``store`` (an ObjectStore) the photos' bytes too."""
    from shoplens import ops
    from shoplens.config import Settings
    from shoplens.manifest import engine_for

    with engine_for(url).begin() as conn:
        q = lambda sql, **p: conn.execute(sa.text(sql), p)  # noqa: E731
        run1 = q("INSERT INTO crawl_runs (run_key, shop_base_url, status) VALUES (:k, 'http://shop', 'success')"
                 " RETURNING id", k=NIGHT1).scalar_one()
        q("INSERT INTO crawl_runs (run_key, shop_base_url, status) VALUES (:k, 'http://shop', 'success')", k=NIGHT2)
        for cat, name in (("10120000", "침대"), ("16220000", "그릇")):
            q("INSERT INTO categories VALUES (:c, :n, NULL, :r, :r)", c=cat, n=name, r=run1)
        for pid, (name, cat) in PRODUCTS.items():
            q("INSERT INTO products (id, category_id, name, source_url, first_seen_run, last_seen_run)"
              " VALUES (:p, :c, :n, 'http://shop/p', :r, :r)", p=pid, c=cat, n=name, r=run1)
        for i, pid in enumerate(PHOTO_PRODUCT):
            data = jpeg(i)
            sha = photo_sha(i)
            key = f"images/{sha[:2]}/{sha}.jpg"
            if store is not None:
                store.put_bytes(key, data, "image/jpeg")
            q("INSERT INTO reviews (id, product_id, source_url, first_seen_run) VALUES (:i, :p, 'u', :r)",
              i=i + 1, p=pid, r=run1)
            q("INSERT INTO images (sha256, object_key, size_bytes, width, height, format, source_url,"
              " review_id, product_id, first_seen_run) VALUES (:s, :k, :b, 640, 480, 'jpeg', 'u', :i, :p, :r)",
              s=sha, k=key, b=len(data), i=i + 1, p=pid, r=run1)
        frun = q("INSERT INTO filter_runs (run_key, status, detector_version, rule_version, params, stats)"
                 " VALUES (:k, 'success', 'yolox_nano', 'r1', '{}', :stats) RETURNING id", k=NIGHT1,
                 stats=f'{{"report_key": "{FILTER_REPORT_KEY}"}}').scalar_one()
        if store is not None:
            store.put_bytes(FILTER_REPORT_KEY, FILTER_REPORT.encode(), "text/html; charset=utf-8")
            store.put_bytes("models/m1/report/index.html", MODEL_REPORT.encode(), "text/html")
            store.put_bytes("models/m1/report/learning_curves.png", jpeg(0, (8, 8)), "image/png")
            store.put_bytes("models/m1/ensemble.json", b"{}", "application/json")
        for i in range(len(PHOTO_PRODUCT)):
            for rule in RULES:
                failed = rule in FAILED_RULES.get(i, [])
                q("INSERT INTO rule_decisions (sha256, rule, run_id, passed, score, reason, rule_version,"
                  " detector_version, params) VALUES (:s, :rule, :r, :ok, :score, :why, 'r1', 'yolox_nano', '{}')",
                  s=photo_sha(i), rule=rule, r=frun, ok=not failed, score=0.3 if failed else 0.9,
                  why=f"{rule} on photo {i}" if failed else None)
        for pid, label in LABELS.items():
            q("INSERT INTO label_map (label, product_id, first_version) VALUES (:l, :p, 'v0001')", l=label, p=pid)
        t0 = datetime(2026, 1, 3, 2, 0, tzinfo=timezone.utc)
        for seq, (version, parent, status, members) in enumerate(
                [("v0001", None, "complete", V1), ("v0002", "v0001", "complete", V2),
                 ("v0003", "v0002", "failed", {})], start=1):
            q("INSERT INTO dataset_versions (version_id, seq, parent_version, run_key, status, created_at,"
              " code_version, content_hash, uri) VALUES (:v, :seq, :parent, :k, :st, :at, 'c1', :h, 's3://x')",
              v=version, seq=seq, parent=parent, k=NIGHT1 if seq == 1 else NIGHT2, st=status,
              at=t0 + timedelta(days=seq), h=f"{seq:064d}")
            for i, split in members.items():
                pid = PHOTO_PRODUCT[i]
                sha = photo_sha(i)
                q("INSERT INTO dataset_members (version_id, sha256, label, product_id, split, cluster_id,"
                  " object_key, product_name, category_id, review_id, source_url, crawl_run, width, height,"
                  " format) VALUES (:v, :s, :l, :p, :split, :s, :k, :n, :c, :rv, 'u', :r, 640, 480, 'jpeg')",
                  v=version, s=sha, l=LABELS[pid], p=pid, split=split, k=f"images/{sha[:2]}/{sha}.jpg",
                  n=PRODUCTS[pid][0], c=PRODUCTS[pid][1], rv=i + 1, r=run1)
        for model, trained_on, promoted, reason, at in (
                ("m1", "v0001", True, "first model", t0 + timedelta(days=1, hours=1)),
                ("m2", "v0002", False, "Top-1 0.760 < current 0.780 - margin 0.0", t0 + timedelta(days=2, hours=1))):
            q("INSERT INTO models (id, dataset_version, profile, status, promoted, reason, artifact_prefix,"
              " created_at) VALUES (:m, :v, 'tiny', 'complete', :p, :why, :prefix, :at)",
              m=model, v=trained_on, p=promoted, why=reason, at=at, prefix=f"models/{model}/")
        for model, on, top1, top3, n in (("m1", "v0001", 0.80, 0.95, 2), ("m1", "v0002", 0.78, 0.93, 2),
                                         ("m2", "v0002", 0.76, 0.92, 2)):
            q("INSERT INTO model_metrics (model_id, dataset_version, split, member, top1, top3, n)"
              " VALUES (:m, :v, 'test', 'ensemble', :t1, :t3, :n)", m=model, v=on, t1=top1, t3=top3, n=n)
            q("INSERT INTO model_metrics (model_id, dataset_version, split, member, top1, top3, n)"
              " VALUES (:m, :v, 'test', 'effnet_lite0', 0.1, 0.2, :n)", m=model, v=on, n=n)
        q("INSERT INTO model_promotions (model_id, reason) VALUES ('m1', 'first model')")
    settings = Settings(manifest_url=url)
    start = datetime(2026, 1, 2, 17, 0, tzinfo=timezone.utc)
    ops.record_stage(settings, NIGHT1, "crawl:10120000", start, start + timedelta(seconds=95),
                     "success", {"photos_stored": 18})
    ops.record_stage(settings, NIGHT1, "filter", start + timedelta(seconds=100),
                     start + timedelta(seconds=160), "success", {"decided": 24, "rejected": 5})
    ops.record_stage(settings, NIGHT1, "run", start, start + timedelta(seconds=200), "success",
                     {"crawl.images_new": 24})
