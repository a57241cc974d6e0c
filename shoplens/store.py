"""The object store (MinIO / any S3 API) through the official ``minio`` client, and, on the
per-photo hot paths (the stages' reads, the crawler's photo writes), through plain keep-alive
HTTP/1.1 requests signed by minio's own signer.

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
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from collections import deque
from typing import Any, Callable, Iterable, Iterator
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


class ObjectRequestError(StoreError):
    """A request answered with an error status; ``code`` is the S3 error code."""

    method = "?"

    def __init__(self, key: str, status: int, code: str):
        super().__init__(f"{self.method} {key}: HTTP {status} {code}")
        self.key, self.status, self.code = key, status, code


class ObjectReadError(ObjectRequestError):
    """A GET answered with an error status (e.g. 404 ``NoSuchKey``)."""

    method = "GET"


class ObjectWriteError(ObjectRequestError):
    """A PUT answered with an error status (e.g. 403 ``AccessDenied``, 404 ``NoSuchBucket``)."""

    method = "PUT"


def image_key(sha256: str, fmt: str) -> str:
    ext = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
    return f"{IMAGE_PREFIX}/{sha256[:2]}/{sha256}.{ext}"


class ObjectStore:
    def __init__(self, settings: Settings):
        self.bucket = settings.s3_bucket
        self._signed = _SignedS3(settings)
        # Writes on connections of their own: a PUT never lands between pipelined GETs' answers.
        self._signed_writes = _SignedS3(settings)
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
        """The object's bytes, like :meth:`get_bytes`, through a plain keep-alive HTTP/1.1
        connection per thread signed by minio's SigV4 signer instead of the minio client: about
        a sixth of its CPU per object. Errors: :class:`ObjectReadError` (an S3 error status),
        ``OSError`` / ``http.client.HTTPException`` (connection)."""
        return self._signed.get(self.bucket, key)

    def read_objects(self, items: Iterable, key: Callable[[Any], str] = lambda item: item,
                     in_flight: int = 8) -> Iterator[tuple[Any, bytes | None, Exception | None]]:
        """``(item, bytes, None)`` or ``(item, None, error)`` for each item's object
        (``key(item)``), in order, read as :meth:`read_object` does with up to ``in_flight``
        requests pipelined on one connection: the store reads ahead while the caller computes,
        without threads (the per-photo stages' reads)."""
        return self._signed.get_many(self.bucket, items, key, in_flight)

    def write_object(self, key: str, data: bytes, content_type: str,
                     sha256: str | None = None) -> None:
        """Store ``data`` under ``key``, like :meth:`put_bytes` without metadata, in one signed PUT
        on a kept-alive connection per thread (signed as :meth:`read_object`'s GETs are, on
        connections of its own): less than half the minio client's CPU per object, and the
        payload hash is not computed again when the caller knows it (``sha256``, hex; a
        content-addressed key's). Errors: :class:`ObjectWriteError` (an S3 error status),
        ``OSError`` / ``http.client.HTTPException`` (connection)."""
        self._signed_writes.put(self.bucket, key, data, content_type, sha256)

    def put_json(self, key: str, obj) -> None:
        data = json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True).encode()
        self.put_bytes(key, data, "application/json")

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
            yield obj.object_name

    def remove(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)


class _SignedS3:
    """S3 GETs and PUTs over one kept-alive HTTP/1.1 connection per thread (path-style URLs,
    signed by minio's SigV4 signer). GETs are **pipelined**: up to ``in_flight`` requests are
    written ahead and the answers read back in order, so the store works on the next photos while
    the caller computes, with no thread per request. The protocol is the small part of HTTP/1.1
    an S3 GET or PUT needs (status line, headers, a ``Content-Length`` or chunked body,
    ``Connection: close``)."""

    def __init__(self, settings: Settings):
        self.host = settings.s3_endpoint
        self.secure = settings.s3_secure
        self.region = settings.s3_region or "us-east-1"
        self.credentials = Credentials(settings.s3_access_key, settings.s3_secret_key)
        self._local = threading.local()

    def _head(self, method: str, bucket: str, key: str, payload_sha256: str = _EMPTY_SHA256,
              extra: dict[str, str] | None = None) -> bytes:
        """The request line and headers, signed by minio's own SigV4 signer: the same signature
        its client sends, without its per-request machinery around it."""
        path = "/" + quote(f"{bucket}/{key}", safe="/-_.~")
        now = datetime.datetime.now(datetime.timezone.utc)
        headers = {"Host": self.host, "x-amz-content-sha256": payload_sha256,
                   "x-amz-date": now.strftime("%Y%m%dT%H%M%SZ"), **(extra or {})}
        url = urlsplit(f"{'https' if self.secure else 'http'}://{self.host}{path}")
        signed = sign_v4_s3(method=method, url=url, region=self.region, headers=headers,
                            credentials=self.credentials, content_sha256=payload_sha256, date=now)
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in signed.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def put(self, bucket: str, key: str, data: bytes, content_type: str,
            sha256: str | None = None) -> None:
        """One PUT, sent again once on a new connection when the kept-alive one turns out closed
        (a PUT of the same bytes to the same key is idempotent)."""
        head = self._head("PUT", bucket, key, sha256 or hashlib.sha256(data).hexdigest(),
                          {"Content-Type": content_type, "Content-Length": str(len(data))})
        for attempt in (1, 2):
            try:
                self._connection()[0].sendall(head + data)
                status, body, close = self._read_response()
            except (OSError, http.client.HTTPException):
                self._drop()
                if attempt == 2:
                    raise
                continue
            if close:
                self._drop()
            if status != 200:
                raise ObjectWriteError(key, status, _error_code(body))
            return

    def get(self, bucket: str, key: str) -> bytes:
        [(_, body, error)] = self.get_many(bucket, [key], key=lambda k: k, in_flight=1)
        if error is not None:
            raise error
        return body

    def get_many(self, bucket: str, items: Iterable, key: Callable[[Any], str],
                 in_flight: int = 8) -> Iterator[tuple[Any, bytes | None, Exception | None]]:
        """``(item, bytes, None)`` or ``(item, None, error)`` per item, in order; up to
        ``in_flight`` requests outstanding on the thread's connection. A connection the server
        closed (idle timeout, ``Connection: close``) is reopened and the unanswered requests are
        sent again, once; an S3 error answer is an :class:`ObjectReadError` for that item only."""
        iterator = iter(items)
        pending: deque = deque()  # (item, request bytes, resent already) written, not yet read
        try:
            yield from self._pipeline(iterator, pending, key, bucket, in_flight)
        finally:
            if pending:  # abandoned or failed with answers unread: they must not reach a later read
                self._drop()

    def _pipeline(self, iterator, pending: deque, key, bucket: str, in_flight: int):
        while True:
            while len(pending) < max(1, in_flight):
                item = next(iterator, _END)
                if item is _END:
                    break
                request = self._head("GET", bucket, key(item))
                pending.append([item, request, False])
                self._send(request, pending)
            if not pending:
                return
            item, _, _ = pending[0]
            try:
                status, body, close = self._read_response()
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                if pending[0][2]:  # already answered nothing twice: give up on this item
                    pending.popleft()
                    yield item, None, exc
                for entry in pending:
                    entry[2] = True
                self._resend(pending)
                continue
            pending.popleft()
            if close:  # the server ends the connection here: the rest go again on a new one
                self._drop()
                self._resend(pending)
            if status == 200:
                yield item, body, None
            else:
                yield item, None, ObjectReadError(key(item), status, _error_code(body))

    # --- the connection ------------------------------------------------------------------------
    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            host, _, port = self.host.rpartition(":") if ":" in self.host else (self.host, "", "")
            sock = socket.create_connection(
                (host, int(port or (443 if self.secure else 80))), timeout=300)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            conn = self._local.conn = (sock, sock.makefile("rb", buffering=256 * 1024))
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            for part in reversed(conn):
                try:
                    part.close()
                except OSError:
                    pass

    def _send(self, request: bytes, pending: deque) -> None:
        try:
            self._connection()[0].sendall(request)
        except OSError:  # a kept-alive connection the server closed: everything unanswered again
            self._drop()
            self._resend(pending)

    def _resend(self, pending: deque) -> None:
        if pending:
            self._connection()[0].sendall(b"".join(entry[1] for entry in pending))

    def _read_response(self) -> tuple[int, bytes, bool]:
        reader = self._connection()[1]
        status_line = reader.readline(65537)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise http.client.BadStatusLine(repr(status_line))
        status = int(parts[1])
        length, chunked, close = None, False, parts[0] == b"HTTP/1.0"
        while True:
            line = reader.readline(65537)
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise http.client.IncompleteRead(b"")
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = value == b"close" or (close and value != b"keep-alive")
        if chunked:
            body = bytearray()
            while True:
                size = int(reader.readline(65537).split(b";")[0], 16)
                if size == 0:
                    while reader.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                body += _read_exactly(reader, size)
                reader.readline(65537)
            return status, bytes(body), close
        if length is None:  # the body runs to the end of the connection
            return status, reader.read(), True
        return status, _read_exactly(reader, length), close


_END = object()


def _read_exactly(reader, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise http.client.IncompleteRead(data, n - len(data))
    return data


def _error_code(body: bytes) -> str:
    try:
        return ET.fromstring(body).findtext("Code") or "unknown"
    except ET.ParseError:
        return "unknown"
