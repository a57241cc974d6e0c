"""Where models live: artefacts under ``models/<model_id>/`` in the object store, rows in the
manifest (``models``, ``model_metrics``, ``model_promotions`` / ``current_model`` and
``current_embedding``), and which one is current: promotions are history, the newest
``model_promotions`` row of a kind names that kind's current model (the training gate adds one;
:func:`promote` and :func:`rollback` add one by hand).

Two kinds of model share this registry (``models.kind``): the closed-set ``ensemble``
(``ensemble.json`` marks a complete artefact) and the search ``embedding`` (``embedding.json``,
:mod:`shoplens.vision.embedding`). Each kind has its own current model: promoting or rolling back
one kind never changes the other's.

Artefacts are uploaded before the rows that point at them are committed, so a crash never leaves
a row naming missing files; a downloaded model is assembled in a temporary folder and renamed
into place, so a crash never leaves a half model that looks complete.
"""
from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from modeling.ensemble import ENSEMBLE_FILE
from shoplens.config import Settings
from shoplens.manifest import engine_for, session_scope
from shoplens.manifest.schema import (current_embedding, current_model, model_metrics,
                                      model_promotions, models)
from shoplens.vision import current as vision_current
from shoplens.vision.current import (ModelNotFound, cache_dir,  # noqa: F401 - the registry's API
                                    load_current_embedding)
from shoplens.vision.embedding import EMBEDDING_FILE

MODEL_PREFIX = "models"
KINDS = ("ensemble", "embedding")
# The file whose presence marks a complete artefact of each kind (uploaded last).
COMPLETE_FILE = {"ensemble": ENSEMBLE_FILE, "embedding": EMBEDDING_FILE}
# Each kind's current model (a view over model_promotions) and its headline metrics row.
CURRENT_VIEW = {"ensemble": current_model, "embedding": current_embedding}
HEADLINE_MEMBER = {"ensemble": "ensemble", "embedding": "embedding"}
# Taken by every change of the current model, so two cannot interleave.
PROMOTION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('shoplens.model_promotion'))"


class PromotionRefused(ValueError):
    """The model cannot become the current one (not complete, or nothing to roll back to)."""


def artifact_prefix(model_id: str) -> str:
    return f"{MODEL_PREFIX}/{model_id}/"


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"model kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def upload(settings: Settings, model_id: str, local_dir: Path) -> str:
    from shoplens.store import ObjectStore

    store = ObjectStore(settings)
    store.ensure_bucket()
    prefix = artifact_prefix(model_id)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    # ensemble.json / embedding.json last: its presence marks a complete upload.
    markers = {local_dir / name for name in COMPLETE_FILE.values()}
    files.sort(key=lambda p: p in markers)
    for path in files:
        rel = path.relative_to(local_dir).as_posix()
        ctype = {".json": "application/json", ".html": "text/html", ".png": "image/png"}.get(
            path.suffix, "application/octet-stream")
        store.put_bytes(prefix + rel, path.read_bytes(), ctype)
    return prefix


def fetch(settings: Settings, model_id: str | None, cache_dir: Path) -> tuple[str, Path]:
    """The model's id and local directory: ``model_id``, or the current model when None.
    An unreachable manifest or object store is a clear ServiceUnreachable, not a traceback."""
    import urllib3.exceptions

    from shoplens.cli import ServiceUnreachable

    try:
        model_id = model_id or current_model_id(settings)
        if not model_id:
            raise ModelNotFound("no current model: train one first (shoplens train) "
                                "or pass --model ID|DIR")
        return model_id, download(settings, model_id, cache_dir)
    except (sa.exc.OperationalError, urllib3.exceptions.HTTPError) as exc:
        where = ("manifest" if isinstance(exc, sa.exc.OperationalError)
                 else f"object store at {settings.s3_endpoint}")
        raise ServiceUnreachable(f"cannot load model {model_id or '(current)'}: the {where} is "
                                 f"unreachable ({type(exc).__name__})") from exc


def download(settings: Settings, model_id: str, cache_dir: Path) -> Path:
    """The model's directory in ``cache_dir`` (downloaded once)."""
    return vision_current.download(settings, model_id, artifact_prefix(model_id), cache_dir,
                                   tuple(COMPLETE_FILE.values()))


def current_model_id(settings: Settings, kind: str = "ensemble") -> str | None:
    """The current model of a kind (the closed-set ensemble unless ``kind`` says otherwise)."""
    view = CURRENT_VIEW[check_kind(kind)]
    with engine_for(settings.manifest_url).connect() as conn:
        return conn.execute(sa.select(view.c.id)).scalar()


def begin(settings: Settings, model_id: str, dataset_version: str, profile: str, config: dict,
          kind: str = "ensemble") -> None:
    with session_scope(settings.manifest_url) as conn:
        conn.execute(models.insert().values(
            id=model_id, dataset_version=dataset_version, profile=profile, status="training",
            promoted=False, artifact_prefix=artifact_prefix(model_id), config=config,
            kind=check_kind(kind)))


def fail(settings: Settings, model_id: str, error: str) -> None:
    with session_scope(settings.manifest_url) as conn:
        conn.execute(models.update().where(models.c.id == model_id).values(
            status="failed", error=error[:4000], completed_at=sa.func.now()))


def metric_rows(model_id: str, dataset_version: str, split: str, scores: dict, tta: bool) -> list[dict]:
    return [{"model_id": model_id, "dataset_version": dataset_version, "split": split,
             "member": member, "top1": s["top1"], "top3": s["top3"], "n": s["n"], "tta": tta}
            for member, s in scores.items()]


def save_metrics(conn, rows: list[dict]) -> None:
    from sqlalchemy.dialects.postgresql import insert

    if not rows:
        return
    stmt = insert(model_metrics).values(rows)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=["model_id", "dataset_version", "split", "member"],
        set_={c: stmt.excluded[c] for c in ("top1", "top3", "n", "tta")}))


def ensemble_score(settings: Settings, model_id: str, dataset_version: str,
                   member: str = "ensemble") -> float | None:
    """A model's Top-1 (an embedding's R@1: ``member='embedding'``) on a version's test split,
    if it was measured there."""
    m = model_metrics.c
    with engine_for(settings.manifest_url).connect() as conn:
        return conn.execute(sa.select(m.top1).where(
            m.model_id == model_id, m.dataset_version == dataset_version, m.split == "test",
            m.member == member)).scalar()


def complete(settings: Settings, model_id: str, rows: list[dict], config: dict,
             decide_promotion, kind: str = "ensemble") -> tuple[bool, str]:
    """Store metrics and take the promotion decision in one transaction.

    ``decide_promotion(conn, current_id) -> (promote, reason)`` runs under an advisory lock, so
    two runs finishing together cannot both replace the same current model; ``current_id`` is
    the current model of the same kind.
    """
    with session_scope(settings.manifest_url) as conn:
        conn.execute(sa.text(PROMOTION_LOCK))
        save_metrics(conn, rows)
        current = conn.execute(sa.select(CURRENT_VIEW[check_kind(kind)].c.id)).scalar()
        promote, reason = decide_promotion(conn, current)
        conn.execute(models.update().where(models.c.id == model_id).values(
            status="complete", promoted=promote, reason=reason, config=config,
            completed_at=sa.func.now()))
        if promote:
            conn.execute(model_promotions.insert().values(
                model_id=model_id, previous_model_id=current, reason=reason))
    return promote, reason


# --------------------------------------------------------------------------------------------
# Lifecycle: which model is current
# --------------------------------------------------------------------------------------------
def list_models(settings: Settings, kind: str | None = None) -> list[dict]:
    """Every model (of ``kind``, or of every kind), oldest first, with its headline test scores
    on the version it was trained on (an ensemble's Top-1/Top-3, an embedding's R@1/R@3) and
    whether it is the current one of its kind."""
    m, mm = models.c, model_metrics.c
    headline = sa.or_(*(sa.and_(m.kind == k, mm.member == member)
                        for k, member in HEADLINE_MEMBER.items()))
    scored = models.outerjoin(model_metrics, sa.and_(
        mm.model_id == m.id, mm.dataset_version == m.dataset_version, mm.split == "test",
        headline))
    query = sa.select(m.id, m.kind, m.dataset_version, m.profile, m.status, m.promoted, m.reason,
                      m.created_at, m.completed_at, mm.top1, mm.top3).select_from(scored)
    if kind is not None:
        query = query.where(m.kind == check_kind(kind))
    with engine_for(settings.manifest_url).connect() as conn:
        current = {conn.execute(sa.select(view.c.id)).scalar() for view in CURRENT_VIEW.values()}
        rows = conn.execute(query.order_by(m.created_at, m.id))
        return [{**row._asdict(), "current": row.id in current} for row in rows]


def _make_current(conn, model_id: str, reason: str, kind: str | None = None) -> dict:
    """Add the promotion row that makes ``model_id`` the current model of its kind (under the
    promotion lock); ``kind``, when given, must be the model's."""
    row = conn.execute(sa.select(models.c.status, models.c.kind)
                       .where(models.c.id == model_id)).first()
    if row is None:
        raise ModelNotFound(f"no model {model_id!r} in the manifest")
    if kind is not None and row.kind != kind:
        raise PromotionRefused(f"model {model_id} is an {row.kind} model, not an {kind}")
    if row.status != "complete":
        raise PromotionRefused(f"model {model_id} is {row.status}: only a complete model can be "
                               "current")
    current = conn.execute(sa.select(CURRENT_VIEW[row.kind].c.id)).scalar()
    if current == model_id:
        return {"model_id": model_id, "kind": row.kind, "previous_model_id": current,
                "changed": False, "reason": f"{model_id} is already the current {row.kind} model"}
    conn.execute(model_promotions.insert().values(
        model_id=model_id, previous_model_id=current, reason=reason))
    return {"model_id": model_id, "kind": row.kind, "previous_model_id": current,
            "changed": True, "reason": reason}


def promote(settings: Settings, model_id: str, reason: str) -> dict:
    """Make a complete model the current one of its kind, whatever its scores (a person's
    decision). The other kind's current model is left as it is."""
    if not reason or not reason.strip():
        raise PromotionRefused("a reason is required")
    with session_scope(settings.manifest_url) as conn:
        conn.execute(sa.text(PROMOTION_LOCK))
        return _make_current(conn, model_id, reason.strip())


def rollback(settings: Settings, reason: str, to: str | None = None,
             kind: str = "ensemble") -> dict:
    """Make the model of ``kind`` that was current before the current one current again
    (``to``: another complete model of that kind). History is kept: this adds a promotion row,
    so a second rollback undoes the first. The other kind's current model is left as it is."""
    check_kind(kind)
    with session_scope(settings.manifest_url) as conn:
        conn.execute(sa.text(PROMOTION_LOCK))
        p = model_promotions.c
        latest = conn.execute(
            sa.select(p.model_id, p.previous_model_id)
            .select_from(model_promotions.join(models, models.c.id == p.model_id))
            .where(models.c.kind == kind).order_by(p.id.desc()).limit(1)).first()
        if latest is None:
            raise PromotionRefused(f"no {kind} model has been promoted yet: nothing to roll back")
        target = to or latest.previous_model_id
        if target is None:
            raise PromotionRefused(f"model {latest.model_id} was the first current model "
                                   f"({kind}): there is no earlier one to roll back to")
        why = f"rollback from {latest.model_id}" + (f": {reason.strip()}" if reason.strip() else "")
        return _make_current(conn, target, why, kind)
