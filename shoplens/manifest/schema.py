"""The manifest's schema: every table of every stage, as one SQLAlchemy Core ``MetaData``.

The Alembic migrations in ``migrations/versions`` create and evolve the database; ``metadata``
describes the same tables, column for column, and is Alembic's ``target_metadata``, so
``tests/test_schema.py`` can run Alembic's compare and fail on any drift between the two.
Every stage reads and writes the manifest through these table objects; no stage declares its own.

Views are created by the migrations too (their SQL lives there). The ones the code selects from
as table objects are declared in the separate ``views`` MetaData, so that Alembic's compare
does not take them for tables.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()
views = sa.MetaData()


def _inserted_at(name: str = "created_at") -> sa.Column:
    """A timestamp the database sets to now() when the row is inserted."""
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())


# --------------------------------------------------------------------------------------------
# Crawl (migration 0001_crawl)
# --------------------------------------------------------------------------------------------
crawl_runs = sa.Table(
    "crawl_runs", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    # The orchestrator's id for this run (Airflow run_id) so that a retried task reuses its run row.
    sa.Column("run_key", sa.Text, nullable=False, unique=True),
    _inserted_at("started_at"),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.Text, nullable=False, server_default="running"),
    sa.Column("shop_base_url", sa.Text, nullable=False),
    sa.Column("settings", JSONB, nullable=False, server_default="{}"),
    sa.Column("stats", JSONB, nullable=False, server_default="{}"),
    sa.CheckConstraint("status IN ('running', 'success', 'failed')", name="crawl_runs_status"),
)

categories = sa.Table(
    "categories", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("source_url", sa.Text),
    sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    sa.Column("last_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
)

products = sa.Table(
    "products", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("category_id", sa.Text, sa.ForeignKey("categories.id"), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("brand", sa.Text),
    sa.Column("price", sa.BigInteger),
    sa.Column("rank", sa.Integer),
    sa.Column("review_count", sa.Integer),
    sa.Column("rating", sa.Float),
    sa.Column("source_url", sa.Text, nullable=False),
    sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    sa.Column("last_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    _inserted_at("first_seen_at"),
    _inserted_at("last_seen_at"),
    # Run that last walked every review page of this product to the end; incremental crawls stop
    # paging at reviews already known at that point.
    sa.Column("reviews_synced_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
    sa.Index("products_category", "category_id"),
)

# Rank history: one row per run and product, so "rank per night" is a query, not a guess.
product_ranks = sa.Table(
    "product_ranks", metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), primary_key=True),
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), primary_key=True),
    sa.Column("category_id", sa.Text, sa.ForeignKey("categories.id"), nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("review_count", sa.Integer),
    sa.Column("rating", sa.Float),
    sa.Column("source_url", sa.Text, nullable=False),
)

reviews = sa.Table(
    "reviews", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), nullable=False),
    sa.Column("created_date", sa.Date),
    sa.Column("stars", sa.Float),
    sa.Column("comment", sa.Text),
    sa.Column("writer_nickname", sa.Text),
    sa.Column("photo_url", sa.Text),  # NULL for reviews without a photo
    sa.Column("source_url", sa.Text, nullable=False),  # the reviews API page it came from
    sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    sa.Index("reviews_product", "product_id"),
)

images = sa.Table(
    "images", metadata,
    sa.Column("sha256", sa.CHAR(64), primary_key=True),
    sa.Column("object_key", sa.Text, nullable=False, unique=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
    sa.Column("source_url", sa.Text, nullable=False),
    sa.Column("review_id", sa.BigInteger, sa.ForeignKey("reviews.id"), nullable=False),
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), nullable=False),
    sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    _inserted_at(),
    sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="images_sha256_hex"),
    sa.CheckConstraint("width > 0 AND height > 0 AND size_bytes > 0", name="images_positive"),
    sa.Index("images_product", "product_id"),
    sa.Index("images_run", "first_seen_run"),
)

# A review photo whose bytes equal an already stored image (the same photo posted twice) keeps
# its own link here; the image row names the first review that brought the bytes.
review_photos = sa.Table(
    "review_photos", metadata,
    sa.Column("review_id", sa.BigInteger, sa.ForeignKey("reviews.id"), primary_key=True),
    sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), nullable=False),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    sa.Index("review_photos_sha256", "sha256"),
)

crawl_failures = sa.Table(
    "crawl_failures", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    sa.Column("category_id", sa.Text),
    sa.Column("product_id", sa.BigInteger),
    sa.Column("review_id", sa.BigInteger),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("stage", sa.Text, nullable=False),  # ranking | product | reviews | image | browser
    sa.Column("reason", sa.Text, nullable=False),  # short machine-readable code, e.g. http_500
    sa.Column("detail", sa.Text),
    _inserted_at(),
    sa.Index("crawl_failures_run", "run_id"),
)

# --------------------------------------------------------------------------------------------
# Dedup (migration 0002_dedup; view duplicate_clusters_for_review)
# --------------------------------------------------------------------------------------------
image_hashes = sa.Table(
    "image_hashes", metadata,
    sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
    # 64-bit hashes as the signed BIGINT with the same bits (two's complement).
    sa.Column("phash", sa.BigInteger, nullable=False),
    sa.Column("dhash", sa.BigInteger, nullable=False),
    sa.Column("hash_version", sa.Text, nullable=False),
    sa.Column("computed_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
    _inserted_at("computed_at"),
)

# One photo embedding per image for dedup's second signal (migration 0008_dedup_embeddings):
# dim float16 values, unit length; another embedding_version is recomputed.
image_embeddings = sa.Table(
    "image_embeddings", metadata,
    sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
    sa.Column("embedding_version", sa.Text, nullable=False),
    sa.Column("dim", sa.Integer, nullable=False),
    sa.Column("vector", sa.LargeBinary, nullable=False),
    sa.Column("computed_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
    _inserted_at("computed_at"),
    # Grayscale thumbnail (side x side uint8) for the geometric check of candidate pairs (0010).
    sa.Column("thumbnail", sa.LargeBinary),
    sa.CheckConstraint("octet_length(vector) = 2 * dim", name="image_embeddings_vector_size"),
)

image_dedup = sa.Table(
    "image_dedup", metadata,
    sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
    # The representative's sha256; a singleton is its own cluster.
    sa.Column("cluster_id", sa.CHAR(64), sa.ForeignKey("images.sha256"), nullable=False),
    # NULL for representatives and singletons.
    sa.Column("duplicate_of", sa.CHAR(64), sa.ForeignKey("images.sha256")),
    sa.Column("distance", sa.Integer),  # pHash + dHash Hamming distance to the representative
    sa.Column("threshold", sa.Integer, nullable=False),
    sa.Column("spans_products", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
    _inserted_at("decided_at"),
    # Embedding rule + version the row was decided under (migration 0008); NULL: hashes only.
    sa.Column("embedding_rule", sa.Text),
    sa.CheckConstraint("(duplicate_of IS NULL) = (distance IS NULL)",
                       name="image_dedup_distance_iff_duplicate"),
    sa.CheckConstraint("duplicate_of IS NULL OR duplicate_of = cluster_id",
                       name="image_dedup_points_to_representative"),
    sa.Index("image_dedup_cluster", "cluster_id"),
    sa.Index("image_dedup_spans_products", "cluster_id", postgresql_where=sa.text("spans_products")),
)

# --------------------------------------------------------------------------------------------
# Filter (migration 0003_filter; views image_verdicts, kept_images)
# --------------------------------------------------------------------------------------------
filter_runs = sa.Table(
    "filter_runs", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("run_key", sa.Text, nullable=False, unique=True),
    _inserted_at("started_at"),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.Text, nullable=False, server_default="running"),
    sa.Column("detector_version", sa.Text, nullable=False),
    sa.Column("rule_version", sa.Text, nullable=False),
    sa.Column("params", JSONB, nullable=False, server_default="{}"),
    sa.Column("stats", JSONB, nullable=False, server_default="{}"),
    sa.CheckConstraint("status IN ('running', 'success', 'failed')", name="filter_runs_status"),
)

# Raw detections (every box >= min_score) and image statistics, once per image and detector.
detections = sa.Table(
    "detections", metadata,
    sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
    sa.Column("detector_version", sa.Text, primary_key=True),
    sa.Column("features_version", sa.Text, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("boxes", JSONB, nullable=False),
    sa.Column("stats", JSONB, nullable=False),
    sa.Column("min_score", sa.Float, nullable=False),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("filter_runs.id"), nullable=False),
    _inserted_at(),
)

# Decision history: one row per image, rule and run that decided it.
rule_decisions = sa.Table(
    "rule_decisions", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), nullable=False),
    sa.Column("rule", sa.Text, nullable=False),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("filter_runs.id"), nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("reason", sa.Text),
    sa.Column("rule_version", sa.Text, nullable=False),
    sa.Column("detector_version", sa.Text, nullable=False),
    sa.Column("params", JSONB, nullable=False),
    _inserted_at("decided_at"),
    sa.UniqueConstraint("sha256", "rule", "run_id", name="rule_decisions_once_per_run"),
    sa.Index("rule_decisions_latest", "sha256", "rule", "run_id"),
)

# sha256 names an image or a salvaged crop (no foreign key since 0009_salvage: it may be either;
# ``shoplens override`` checks it is one of them).
image_overrides = sa.Table(
    "image_overrides", metadata,
    sa.Column("sha256", sa.CHAR(64), primary_key=True),
    sa.Column("verdict", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False, server_default=sa.text("current_user")),
    _inserted_at(),
    sa.CheckConstraint("verdict IN ('keep', 'reject')", name="image_overrides_verdict"),
    sa.CheckConstraint("length(btrim(reason)) > 0", name="image_overrides_reason"),
)

# Salvage (migration 0009_salvage; crops listed by the kept_images view): one row per photo the
# filter's salvage looked at (rejected as multi-product); sha256 is set when a crop of it was
# salvaged, with its lineage (parent, detector box, crop rectangle, class, scores, product, review,
# filter run). See dataset/filter/salvage.py.
salvaged_crops = sa.Table(
    "salvaged_crops", metadata,
    sa.Column("parent_sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("filter_runs.id"), nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), nullable=False),
    sa.Column("review_id", sa.BigInteger, sa.ForeignKey("reviews.id"), nullable=False),
    sa.Column("detector_version", sa.Text, nullable=False),
    sa.Column("embedding_model", sa.Text),
    sa.Column("threshold", sa.Float, nullable=False),
    sa.Column("best_score", sa.Float),
    sa.Column("runner_up_score", sa.Float),
    sa.Column("reference_photos", sa.Integer, nullable=False),
    sa.Column("label", sa.Text),
    sa.Column("detector_score", sa.Float),
    sa.Column("box", JSONB(none_as_null=True)),
    sa.Column("crop_box", JSONB(none_as_null=True)),
    sa.Column("sha256", sa.CHAR(64), unique=True),
    sa.Column("object_key", sa.Text, unique=True),
    sa.Column("size_bytes", sa.BigInteger),
    sa.Column("width", sa.Integer),
    sa.Column("height", sa.Integer),
    sa.Column("source_url", sa.Text),
    _inserted_at(),
    sa.CheckConstraint("outcome IN ('salvaged', 'no_match', 'ambiguous', 'no_box')",
                       name="salvaged_crops_outcome"),
    sa.CheckConstraint("(outcome = 'salvaged') = (sha256 IS NOT NULL)",
                       name="salvaged_crops_sha256_iff_salvaged"),
    sa.CheckConstraint("sha256 IS NULL OR (object_key IS NOT NULL AND box IS NOT NULL AND "
                       "crop_box IS NOT NULL AND width > 0 AND height > 0 AND size_bytes > 0 "
                       "AND source_url IS NOT NULL)", name="salvaged_crops_complete"),
    sa.Index("salvaged_crops_run", "run_id"),
)

# --------------------------------------------------------------------------------------------
# Dataset build (migration 0004_dataset; views dataset_version_*, dataset_split_leakage, ...)
# --------------------------------------------------------------------------------------------
# A product's label, assigned once and never changed or reused.
label_map = sa.Table(
    "label_map", metadata,
    sa.Column("label", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), nullable=False,
              unique=True),
    sa.Column("first_version", sa.Text, nullable=False),
    _inserted_at(),
    sa.CheckConstraint("label >= 0", name="label_map_label_nonnegative"),
)

dataset_versions = sa.Table(
    "dataset_versions", metadata,
    sa.Column("version_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False, unique=True),
    sa.Column("parent_version", sa.Text, sa.ForeignKey("dataset_versions.version_id")),
    sa.Column("run_key", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="building"),
    _inserted_at(),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("code_version", sa.Text, nullable=False),
    # Rules and thresholds in force: build settings, dedup/filter settings and thresholds.
    sa.Column("params", JSONB, nullable=False, server_default="{}"),
    sa.Column("counts", JSONB, nullable=False, server_default="{}"),
    # Products left out for too few kept photos, with their counts: [{product_id, photos}].
    sa.Column("excluded_products", JSONB, nullable=False, server_default="[]"),
    sa.Column("content_hash", sa.CHAR(64), nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("error", sa.Text),
    sa.CheckConstraint("version_id ~ '^v[0-9]{4,}$'", name="dataset_versions_id_format"),
    sa.CheckConstraint("status IN ('building', 'complete', 'failed')",
                       name="dataset_versions_status"),
    sa.Index("dataset_versions_run_key", "run_key"),
)

# A snapshot: provenance columns are copied at build time so that a version's export can be
# re-materialised byte for byte even after products or images change later.
dataset_members = sa.Table(
    "dataset_members", metadata,
    sa.Column("version_id", sa.Text,
              sa.ForeignKey("dataset_versions.version_id", ondelete="CASCADE"), primary_key=True),
    # An image or a salvaged crop (no foreign key since 0009_salvage; the build's check
    # every_member_has_its_image_row covers both).
    sa.Column("sha256", sa.CHAR(64), primary_key=True),
    sa.Column("label", sa.Integer, sa.ForeignKey("label_map.label"), nullable=False),
    sa.Column("product_id", sa.BigInteger, nullable=False),
    sa.Column("split", sa.Text, nullable=False),
    sa.Column("cluster_id", sa.CHAR(64), nullable=False),
    sa.Column("object_key", sa.Text, nullable=False),
    sa.Column("product_name", sa.Text, nullable=False),
    sa.Column("category_id", sa.Text, nullable=False),
    sa.Column("review_id", sa.BigInteger, nullable=False),
    sa.Column("source_url", sa.Text, nullable=False),
    sa.Column("crawl_run", sa.BigInteger, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
    sa.CheckConstraint("split IN ('train', 'val', 'test')", name="dataset_members_split"),
    sa.Index("dataset_members_sha256", "sha256"),
    sa.Index("dataset_members_version_split_label", "version_id", "split", "label"),
)

# --------------------------------------------------------------------------------------------
# Modeling (migration 0005_modeling; views current_model, model_scoreboard)
# --------------------------------------------------------------------------------------------
# One row per training run; the row exists from the start so that a crash leaves 'failed'.
models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    # Not a foreign key: a model can also be trained from a local dataset folder (benchmarks).
    sa.Column("dataset_version", sa.Text, nullable=False),
    sa.Column("profile", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="training"),
    sa.Column("promoted", sa.Boolean, nullable=False, server_default=sa.false()),
    # Why it was (not) promoted, in words, e.g. "Top-1 0.812 < current 0.845 - margin 0.0".
    sa.Column("reason", sa.Text),
    sa.Column("artifact_prefix", sa.Text, nullable=False),
    _inserted_at(),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("config", JSONB, nullable=False, server_default="{}"),
    sa.Column("error", sa.Text),
    # 'ensemble' (the closed-set classifier) or 'embedding' (the search embedding, migration
    # 0007_search); each kind has its own current model.
    sa.Column("kind", sa.Text, nullable=False, server_default="ensemble"),
    sa.CheckConstraint("status IN ('training', 'complete', 'failed')", name="models_status"),
    sa.CheckConstraint("kind IN ('ensemble', 'embedding')", name="models_kind"),
    sa.Index("models_dataset_version", "dataset_version"),
)

# Scores of a model (each member and the ensemble) on one dataset version's split. A current
# model re-evaluated on a newer version's test split gets rows for that version too.
model_metrics = sa.Table(
    "model_metrics", metadata,
    sa.Column("model_id", sa.Text, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("dataset_version", sa.Text, primary_key=True),
    sa.Column("split", sa.Text, primary_key=True),
    sa.Column("member", sa.Text, primary_key=True),  # architecture name or 'ensemble'
    sa.Column("top1", sa.Float, nullable=False),
    sa.Column("top3", sa.Float, nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("tta", sa.Boolean, nullable=False, server_default=sa.false()),
    _inserted_at(),
    sa.CheckConstraint("split IN ('train', 'val', 'test')", name="model_metrics_split"),
    sa.CheckConstraint("top1 BETWEEN 0 AND 1 AND top3 BETWEEN 0 AND 1", name="model_metrics_range"),
)

# Promotion history; the latest row names the current model.
model_promotions = sa.Table(
    "model_promotions", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Text, sa.ForeignKey("models.id"), nullable=False),
    sa.Column("previous_model_id", sa.Text, sa.ForeignKey("models.id")),
    sa.Column("reason", sa.Text, nullable=False),
    _inserted_at("promoted_at"),
)

# --------------------------------------------------------------------------------------------
# Search (migration 0007_search; view current_search_index)
# --------------------------------------------------------------------------------------------
# The shop's own image of each product (originalImageUrl): makes a product searchable before any
# review photo of it is kept. Bytes live content-addressed in the object store like review photos
# (images/<sha256>); this row is their provenance.
catalogue_images = sa.Table(
    "catalogue_images", metadata,
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), primary_key=True),
    sa.Column("sha256", sa.CHAR(64), nullable=False),
    sa.Column("object_key", sa.Text, nullable=False),
    sa.Column("source_url", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    _inserted_at("stored_at"),
    sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="catalogue_images_sha256_hex"),
    sa.CheckConstraint("width > 0 AND height > 0 AND size_bytes > 0",
                       name="catalogue_images_positive"),
    sa.Index("catalogue_images_sha256", "sha256"),
)

# One row per built search index (a full build, or an incremental refresh of its parent); the row
# exists from the start so that a crash leaves 'building' or 'failed', never a half index marked
# complete. The artifact (vectors, ANN, products) is under artifact_prefix in the object store.
search_indexes = sa.Table(
    "search_indexes", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("parent_id", sa.Text, sa.ForeignKey("search_indexes.id")),
    # The embedding model it was built with (NULL: the untrained ImageNet baseline).
    sa.Column("model_id", sa.Text, sa.ForeignKey("models.id")),
    sa.Column("embedding", JSONB, nullable=False, server_default="{}"),
    # The dataset version whose kept photos it covers, when built from one.
    sa.Column("dataset_version", sa.Text),
    sa.Column("status", sa.Text, nullable=False, server_default="building"),
    sa.Column("products", sa.Integer, nullable=False, server_default="0"),
    sa.Column("vectors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("added_vectors", sa.Integer, nullable=False, server_default="0"),
    sa.Column("threshold", sa.Float),
    sa.Column("artifact_prefix", sa.Text, nullable=False),
    sa.Column("run_key", sa.Text),
    _inserted_at("built_at"),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("error", sa.Text),
    sa.CheckConstraint("status IN ('building', 'complete', 'failed', 'pruned')",
                       name="search_indexes_status"),
    sa.Index("search_indexes_completed_at", "completed_at"),
)

# --------------------------------------------------------------------------------------------
# Operations (migration 0006_ops)
# --------------------------------------------------------------------------------------------
run_metrics = sa.Table(
    "run_metrics", metadata,
    # The orchestrator's run id (Airflow run_id), the same key the stages get as run_key.
    sa.Column("run_key", sa.Text, primary_key=True),
    # A pipeline stage (crawl, dedup, filter, build, train, ...) or 'run' for the whole night.
    sa.Column("stage", sa.Text, primary_key=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("duration_seconds", sa.Float, nullable=False),
    # Numeric counters the stage reported (images stored, bytes, rejected, ...): data volume.
    sa.Column("volume", JSONB, nullable=False, server_default="{}"),
    # Anything else the stage returned, or the failure message.
    sa.Column("detail", JSONB, nullable=False, server_default="{}"),
    _inserted_at("recorded_at"),
    sa.CheckConstraint("status IN ('success', 'failed')", name="run_metrics_status"),
    sa.CheckConstraint("duration_seconds >= 0", name="run_metrics_duration"),
    sa.Index("run_metrics_recorded_at", "recorded_at"),
)

# --------------------------------------------------------------------------------------------
# Views the code selects from as table objects (SQL in the migrations named above)
# --------------------------------------------------------------------------------------------
# The latest promotion's ensemble: every column of ``models`` plus when it was promoted.
current_model = sa.Table(
    "current_model", views,
    *(sa.Column(c.name, c.type) for c in models.columns),
    sa.Column("promoted_at", sa.DateTime(timezone=True)),
)
# The latest promotion's search embedding (migration 0007_search), same columns.
current_embedding = sa.Table(
    "current_embedding", views,
    *(sa.Column(c.name, c.type) for c in models.columns),
    sa.Column("promoted_at", sa.DateTime(timezone=True)),
)
# The newest complete search index (migration 0007_search): what search answers from.
current_search_index = sa.Table(
    "current_search_index", views,
    *(sa.Column(c.name, c.type) for c in search_indexes.columns),
)
