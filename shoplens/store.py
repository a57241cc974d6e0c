"""The object store (MinIO / any S3 API) through the official ``minio`` client.

Images are content-addressed: the key is derived from the sha256 of the bytes, so the same bytes
are never stored twice and a retried upload is a no-op. Uploads are a single PUT, which S3 makes
atomic: a reader never sees a half-written object, and a crash mid-upload leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Iterator

from minio import Minio
from minio.error import S3Error

from shoplens.config import Settings

IMAGE_PREFIX = "images"

_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
                  "heic": "image/heic"}


class StoreError(RuntimeError):
    """The object store could not be reached or refused an operation."""


def image_key(sha256: str, fmt: str) -> str:
    ext = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
    return f"{IMAGE_PREFIX}/{sha256[:2]}/{sha256}.{ext}"


class ObjectStore:
    def __init__(self, settings: Settings):
        self.bucket = settings.s3_bucket
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            secure=settings.s3_secure,
            region=settings.s3_region,
        )

    def ensure_bucket(self) -> None:
        try:
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreError(f"cannot create bucket {self.bucket!r}: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return False
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream",
                  metadata: dict[str, str] | None = None) -> None:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data),
                               content_type=content_type, metadata=metadata)

    def put_image(self, data: bytes, fmt: str, sha256: str | None = None,
                  metadata: dict[str, str] | None = None) -> tuple[str, bool]:
        """Store image bytes under their content address; returns (key, newly_written)."""
        digest = sha256 or hashlib.sha256(data).hexdigest()
        key = image_key(digest, fmt)
        if self.exists(key):
            return key, False
        self.put_bytes(key, data, _CONTENT_TYPES.get(fmt.lower(), "application/octet-stream"),
                       metadata)
        return key, True

    def get_bytes(self, key: str) -> bytes:
        resp = self.client.get_object(self.bucket, key)
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()

    def put_json(self, key: str, obj) -> None:
        data = json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True).encode()
        self.put_bytes(key, data, "application/json")

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            yield obj.object_name

    def remove(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)
