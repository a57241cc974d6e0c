"""The search embedding in force, and where every stage gets a stored model from.

- ``download(settings, model_id, prefix, cache, markers)``: a model's artifact directory from the
  object store into a local cache, once and atomically (a directory holding one of ``markers``
  is complete: uploads write that file last). The model registry (``modeling/registry.py``) and
  the dataset stages (the filter's salvage) both fetch through it.
- ``load_current_embedding(settings)``: ``(model_id, Embedder)`` of the promoted search embedding
  (view ``current_embedding``, migration 0007_search), or None when none is promoted.
- ``current_embedder(settings)``: the same, falling back to ``(None, baseline_embedder(settings))``,
  the untrained ImageNet embedding on the embedding's backbone.
- ``current_threshold``: the current search index's "confident match" threshold when that index was
  built with the same embedding (its scores are on the same scale), else ``default``.
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


class ModelNotFound(LookupError):
    """No such model (or no current model) in the manifest or the object store."""


def cache_dir(settings: Settings) -> Path:
    """Where downloaded models are kept (``model_work_dir`` or ~/.cache/shoplens)."""
    base = Path(settings.model_work_dir) if settings.model_work_dir else \
        Path.home() / ".cache" / "shoplens"
    return base / "models-cache"


def download(settings: Settings, model_id: str, prefix: str, cache: Path,
             markers: tuple[str, ...] = (EMBEDDING_FILE,)) -> Path:
    """The artifact under ``prefix`` as the local directory ``cache/model_id`` (downloaded once)."""
    from shoplens.store import ObjectStore

    target = cache / model_id
    if any((target / name).is_file() for name in markers):
        return target
    store = ObjectStore(settings)
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    keys = list(store.list_keys(prefix))
    if not any(prefix + name in keys for name in markers):
        raise ModelNotFound(f"model {model_id!r} has no complete artefacts under {prefix} in "
                            f"bucket {settings.s3_bucket!r}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{model_id}-"))
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


def embedding_backbone(settings: Settings) -> str:
    """The embedding's backbone: ``embedding_backbone`` (several joined by ``+``: their
    features concatenated), else the profile's first member."""
    from shoplens.vision import backbones
    from shoplens.vision.embedding import BACKBONE_SEPARATOR

    if settings.embedding_backbone:
        return BACKBONE_SEPARATOR.join(
            backbones.member(name).name
            for name in settings.embedding_backbone.split(BACKBONE_SEPARATOR))
    return backbones.members(settings)[0].name


def baseline_embedder(settings: Settings, image_size: int | None = None) -> Embedder:
    """The untrained ImageNet embedding on the embedding's backbone (``image_size`` None:
    ``search_image_size``, else ``model_image_size``, 0: the backbone's native size)."""
    size = image_size if image_size is not None else (settings.search_image_size
                                                      or settings.model_image_size)
    return Embedder(embedding_backbone(settings), size, settings=settings)


def load_current_embedding(settings: Settings, cache: Path | None = None
                           ) -> tuple[str, Embedder] | None:
    """``(model_id, Embedder)`` of the current (promoted) search embedding, its artefact fetched
    from the object store into ``cache`` (default :func:`cache_dir`) once; None when no embedding
    has been promoted yet. An unreachable manifest or object store is a ServiceUnreachable
    naming which."""
    import urllib3.exceptions

    from shoplens.cli import ServiceUnreachable

    model_id = None
    try:
        with engine_for(settings.manifest_url).connect() as conn:
            row = conn.execute(sa.select(current_embedding.c.id,
                                         current_embedding.c.artifact_prefix)).first()
        if row is None:
            return None
        model_id = row.id
        root = download(settings, row.id, row.artifact_prefix, cache or cache_dir(settings))
    except (sa.exc.OperationalError, urllib3.exceptions.HTTPError) as exc:
        where = ("manifest" if isinstance(exc, sa.exc.OperationalError)
                 else f"object store at {settings.s3_endpoint}")
        raise ServiceUnreachable(f"cannot load embedding {model_id or '(current)'}: the {where} "
                                 f"is unreachable ({type(exc).__name__})") from exc
    return model_id, Embedder.load(root, settings)


def current_embedder(settings: Settings) -> tuple[str | None, Embedder]:
    """(model id, Embedder) of the promoted embedding; (None, untrained baseline) without one."""
    current = load_current_embedding(settings)
    if current is None:
        return None, baseline_embedder(settings)
    return current


def current_threshold(settings: Settings, model_id: str | None, default: float) -> float:
    """The current search index's threshold if it was built with embedding ``model_id``."""
    with engine_for(settings.manifest_url).connect() as conn:
        row = conn.execute(sa.select(current_search_index.c.model_id,
                                     current_search_index.c.threshold)).first()
    if row is None or row.threshold is None or row.model_id != model_id:
        return float(default)
    return float(row.threshold)
