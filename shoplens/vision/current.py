"""The search embedding in force: the promoted embedding model from the manifest and the store.

``current_embedder(settings)`` returns ``(model_id, Embedder)``: the model that
``current_embedding`` (migration 0007_search) names, downloaded once from its artifact prefix in
the object store into a local cache and loaded with :meth:`Embedder.load`; with no promoted
embedding, ``(None, the untrained baseline)`` built from ``settings``. ``current_threshold`` is the
current search index's "confident match" threshold when that index was built with the same
embedding (its scores are on the same scale), else ``default``.

``modeling/registry.py``'s ``load_current_embedding`` does the same for the modeling stage; the
dataset stages may not import modeling, hence this core copy over the same artifact layout
(``models/<id>/embedding.json`` ...) and cache folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import sqlalchemy as sa

from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.manifest.schema import current_embedding, current_search_index
from shoplens.vision.embedding import EMBEDDING_FILE, Embedder, EmbeddingError


def cache_dir(settings: Settings) -> Path:
    """Where downloaded models are kept: the same folder as the model registry's
    (``model_work_dir`` or ~/.cache/shoplens, then ``models-cache``), so one download serves both."""
    base = Path(settings.model_work_dir) if settings.model_work_dir else Path.home() / ".cache" / "shoplens"
    return base / "models-cache"


def download(settings: Settings, model_id: str, prefix: str) -> Path:
    """The artifact under ``prefix`` as a local directory (downloaded once, atomically)."""
    from shoplens.store import ObjectStore

    root = cache_dir(settings)
    target = root / model_id
    if (target / EMBEDDING_FILE).is_file():
        return target
    store = ObjectStore(settings)
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    keys = list(store.list_keys(prefix))
    if prefix + EMBEDDING_FILE not in keys:
        raise EmbeddingError(f"embedding model {model_id!r} has no {EMBEDDING_FILE} under {prefix}")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{model_id}-"))
    try:
        for key in keys:
            dest = tmp / key[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(store.get_bytes(key))
        if target.exists():  # an incomplete earlier copy
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def current_embedder(settings: Settings) -> tuple[str | None, Embedder]:
    """(model id, Embedder) of the promoted embedding; (None, untrained baseline) without one."""
    with engine_for(settings.manifest_url).connect() as conn:
        row = conn.execute(sa.select(current_embedding.c.id, current_embedding.c.artifact_prefix)
                           ).first()
    if row is None:
        return None, Embedder(settings=settings)
    return row.id, Embedder.load(download(settings, row.id, row.artifact_prefix), settings)


def current_threshold(settings: Settings, model_id: str | None, default: float) -> float:
    """The current search index's threshold if it was built with embedding ``model_id``."""
    with engine_for(settings.manifest_url).connect() as conn:
        row = conn.execute(sa.select(current_search_index.c.model_id,
                                     current_search_index.c.threshold)).first()
    if row is None or row.threshold is None or row.model_id != model_id:
        return float(default)
    return float(row.threshold)
