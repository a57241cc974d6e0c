"""The object store (MinIO / any S3 API) through the official ``minio`` client.

Images are content-addressed: the key is derived from the sha256 of the bytes, so the same bytes
are never stored twice and a retried upload is a no-op. Uploads are a single PUT, which S3 makes
atomic: a reader never sees a half-written object, and a crash mid-upload leaves nothing behind.
"""
from __future__ import annotations

import datetime
import hashlib
import http.client
import io
import json
import threading
import xml.etree.ElementTree as ET
from typing import Iterator
from urllib.parse import quote, urlsplit

from minio import Minio
from minio.credentials import Credentials
from minio.signer import sign_v4_s3
from minio.error import S3Error

from shoplens.config import Settings

IMAGE_PREFIX = "images"

# sha256 of an empty body: what a GET signs as its payload.
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif",
                  "heic": "image/heic"}


class StoreError(RuntimeError):
    """The object store could not be reached or refused an operation."""


class ObjectReadError(StoreError):
    """A GET answered with an error status; ``code`` is the S3 error code (e.g. ``NoSuchKey``)."""

    def __init__(self, key: str, status: int, code: str):
        super().__init__(f"GET {key}: HTTP {status} {code}")
        self.key, self.status, self.code = key, status, code


def image_key(sha256: str, fmt: str) -> str:
    ext = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
    return f"{IMAGE_PREFIX}/{sha256[:2]}/{sha256}.{ext}"


class ObjectStore:
    def __init__(self, settings: Settings):
        self.bucket = settings.s3_bucket
        self._reader = _SignedReader(settings)
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

    def read_object(self, key: str) -> bytes:
        """The object's bytes, like :meth:`get_bytes`, through a plain keep-alive HTTP connection
        per thread signed here (AWS signature v4) instead of the minio client: about a third of
        its CPU per object, which the per-photo stages (dedup hashing, filter detection) pay
        once per photo. Errors: :class:`ObjectReadError` (an S3 error status), ``OSError`` /
        ``http.client.HTTPException`` (connection)."""
        return self._reader.get(self.bucket, key)

    def put_json(self, key: str, obj) -> None:
        data = json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True).encode()
        self.put_bytes(key, data, "application/json")

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            yield obj.object_name

    def remove(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)


class _SignedReader:
    """S3 GETs over one ``http.client`` connection per thread (path-style URLs, signed by minio's
    SigV4 signer)."""

    def __init__(self, settings: Settings):
        self.host = settings.s3_endpoint
        self.secure = settings.s3_secure
        self.region = settings.s3_region or "us-east-1"
        self.credentials = Credentials(settings.s3_access_key, settings.s3_secret_key)
        self._local = threading.local()

    def _headers(self, path: str) -> dict[str, str]:
        # minio's own SigV4 signer: the same signature its client sends, without its per-request
        # machinery around it.
        now = datetime.datetime.now(datetime.timezone.utc)
        headers = {"Host": self.host, "x-amz-content-sha256": _EMPTY_SHA256,
                   "x-amz-date": now.strftime("%Y%m%dT%H%M%SZ")}
        url = urlsplit(f"{'https' if self.secure else 'http'}://{self.host}{path}")
        return dict(sign_v4_s3(method="GET", url=url, region=self.region, headers=headers,
                               credentials=self.credentials, content_sha256=_EMPTY_SHA256,
                               date=now))

    def get(self, bucket: str, key: str) -> bytes:
        path = "/" + quote(f"{bucket}/{key}", safe="/-_.~")
        for attempt in (1, 2):  # a kept-alive connection the server has closed: reconnect once
            connection = getattr(self._local, "connection", None)
            fresh = connection is None
            if fresh:
                kind = http.client.HTTPSConnection if self.secure else http.client.HTTPConnection
                connection = self._local.connection = kind(self.host, timeout=300)
            try:
                connection.request("GET", path, headers=self._headers(path))
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self._local.connection = None
                if fresh or attempt == 2:
                    raise
                continue
            if response.status == 200:
                return body
            code = "unknown"
            try:
                code = ET.fromstring(body).findtext("Code") or code
            except ET.ParseError:
                pass
            raise ObjectReadError(key, response.status, code)
        raise AssertionError("unreachable")
