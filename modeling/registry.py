"""Where models live: artefacts under ``models/<model_id>/`` in the object store, rows in the
manifest (``models``, ``model_metrics``, ``model_promotions`` / ``current_model``), and which one
is current: promotions are history, the newest ``model_promotions`` row names the current model
(the training gate adds one; :func:`promote` and :func:`rollback` add one by hand).

Artefacts are uploaded before the rows that point at them are committed, so a crash never leaves
a row naming missing files; a downloaded model is assembled in a temporary folder and renamed
into place, so a crash never leaves a half model that looks complete.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import sqlalchemy as sa

from modeling.ensemble import ENSEMBLE_FILE
from shoplens.config import Settings
from shoplens.manifest import engine_for, session_scope
from shoplens.manifest.schema import current_model, model_metrics, model_promotions, models

MODEL_PREFIX = "models"
# Taken by every change of the current model, so two cannot interleave.
PROMOTION_LOCK = "SELECT pg_advisory_xact_lock(hashtext('shoplens.model_promotion'))"


class ModelNotFound(LookupError):
    """No such model (or no current model) in the manifest or the object store."""


class PromotionRefused(ValueError):
    """The model cannot become the current one (not complete, or nothing to roll back to)."""


def artifact_prefix(model_id: str) -> str:
    return f"{MODEL_PREFIX}/{model_id}/"


def upload(settings: Settings, model_id: str, local_dir: Path) -> str:
    from shoplens.store import ObjectStore

    store = ObjectStore(settings)
    store.ensure_bucket()
    prefix = artifact_prefix(model_id)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    # ensemble.json last: its presence marks a complete upload.
    files.sort(key=lambda p: p.name == ENSEMBLE_FILE)
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
    from shoplens.store import ObjectStore

    target = cache_dir / model_id
    if (target / ENSEMBLE_FILE).is_file():
        return target
    store = ObjectStore(settings)
    prefix = artifact_prefix(model_id)
    keys = list(store.list_keys(prefix))
    if prefix + ENSEMBLE_FILE not in keys:
        raise ModelNotFound(f"model {model_id!r} has no complete artefacts under {prefix} in "
                            f"bucket {settings.s3_bucket!r}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{model_id}-"))
    try:
        for key in keys:
            dest = tmp / key[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(store.get_bytes(key))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def current_model_id(settings: Settings) -> str | None:
    with engine_for(settings.manifest_url).connect() as conn:
        return conn.execute(sa.select(current_model.c.id)).scalar()


def begin(settings: Settings, model_id: str, dataset_version: str, profile: str, config: dict) -> None:
    with session_scope(settings.manifest_url) as conn:
        conn.execute(models.insert().values(
            id=model_id, dataset_version=dataset_version, profile=profile, status="training",
            promoted=False, artifact_prefix=artifact_prefix(model_id), config=config))


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


def ensemble_score(settings: Settings, model_id: str, dataset_version: str) -> float | None:
    """A model's ensemble Top-1 on a version's test split, if it was measured there."""
    m = model_metrics.c
    with engine_for(settings.manifest_url).connect() as conn:
        return conn.execute(sa.select(m.top1).where(
            m.model_id == model_id, m.dataset_version == dataset_version, m.split == "test",
            m.member == "ensemble")).scalar()


def complete(settings: Settings, model_id: str, rows: list[dict], config: dict,
             decide_promotion) -> tuple[bool, str]:
    """Store metrics and take the promotion decision in one transaction.

    ``decide_promotion(conn, current_id) -> (promote, reason)`` runs under an advisory lock, so
    two runs finishing together cannot both replace the same current model.
    """
    with session_scope(settings.manifest_url) as conn:
        conn.execute(sa.text(PROMOTION_LOCK))
        save_metrics(conn, rows)
        current = conn.execute(sa.select(current_model.c.id)).scalar()
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
def list_models(settings: Settings) -> list[dict]:
    """Every model, oldest first, with its ensemble test scores on the version it was trained on
    and whether it is the current one."""
    m, mm = models.c, model_metrics.c
    scored = models.outerjoin(model_metrics, sa.and_(
        mm.model_id == m.id, mm.dataset_version == m.dataset_version, mm.split == "test",
        mm.member == "ensemble"))
    with engine_for(settings.manifest_url).connect() as conn:
        current = conn.execute(sa.select(current_model.c.id)).scalar()
        rows = conn.execute(sa.select(
            m.id, m.dataset_version, m.profile, m.status, m.promoted, m.reason, m.created_at,
            m.completed_at, mm.top1, mm.top3).select_from(scored).order_by(m.created_at, m.id))
        return [{**row._asdict(), "current": row.id == current} for row in rows]


def _make_current(conn, model_id: str, reason: str) -> dict:
    """Add the promotion row that makes ``model_id`` current (under the promotion lock)."""
    status = conn.execute(sa.select(models.c.status)
                          .where(models.c.id == model_id)).scalar()
    if status is None:
        raise ModelNotFound(f"no model {model_id!r} in the manifest")
    if status != "complete":
        raise PromotionRefused(f"model {model_id} is {status}: only a complete model can be current")
    current = conn.execute(sa.select(current_model.c.id)).scalar()
    if current == model_id:
        return {"model_id": model_id, "previous_model_id": current, "changed": False,
                "reason": f"{model_id} is already the current model"}
    conn.execute(model_promotions.insert().values(
        model_id=model_id, previous_model_id=current, reason=reason))
    return {"model_id": model_id, "previous_model_id": current, "changed": True, "reason": reason}


def promote(settings: Settings, model_id: str, reason: str) -> dict:
    """Make a complete model the current one, whatever its scores (a person's decision)."""
    if not reason or not reason.strip():
        raise PromotionRefused("a reason is required")
    with session_scope(settings.manifest_url) as conn:
        conn.execute(sa.text(PROMOTION_LOCK))
        return _make_current(conn, model_id, reason.strip())


def rollback(settings: Settings, reason: str, to: str | None = None) -> dict:
    """Make the model that was current before the current one current again (``to``: another
    complete model). History is kept: this adds a promotion row, so a second rollback undoes
    the first."""
    with session_scope(settings.manifest_url) as conn:
        conn.execute(sa.text(PROMOTION_LOCK))
        p = model_promotions.c
        latest = conn.execute(sa.select(p.model_id, p.previous_model_id)
                              .order_by(p.id.desc()).limit(1)).first()
        if latest is None:
            raise PromotionRefused("no model has been promoted yet: nothing to roll back")
        target = to or latest.previous_model_id
        if target is None:
            raise PromotionRefused(f"model {latest.model_id} was the first current model: "
                                   "there is no earlier one to roll back to")
        why = f"rollback from {latest.model_id}" + (f": {reason.strip()}" if reason.strip() else "")
        return _make_current(conn, target, why)
