"""``shoplens models fetch`` (alias ``python -m dataset models fetch``): download the detector's ONNX file, verified, atomically.

The official asset is ``yolox_nano.onnx`` of YOLOX release 0.1.1rc0; its size and sha256 are
pinned here, so a changed or truncated download never becomes the model. The file is written to
a temporary name beside the destination and renamed only after both checks pass.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from shoplens.cli import argument_parser, command, emit, parse_args
from shoplens.config import Settings
from shoplens.checksums import file_sha256

PINNED_SIZE = 3_659_407
PINNED_SHA256 = "c789161ed43c8269fcd4e67c67eeeb4e80c622da2eb296a20bc6007bd18a0b7d"


class FetchError(RuntimeError):
    """The model could not be downloaded or is not the pinned file."""


def fetch(url: str, dest: str | Path, expected_size: int = PINNED_SIZE,
          expected_sha256: str = PINNED_SHA256, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` if it is not already there with the expected checksum."""
    target = Path(dest).expanduser()
    if target.is_file() and target.stat().st_size == expected_size and file_sha256(target) == expected_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest, size = hashlib.sha256(), 0
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: resp.read(1 << 16), b""):
                    digest.update(chunk)
                    size += len(chunk)
                    if size > expected_size:
                        break
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise FetchError(
                f"cannot download the detector model from {url}: {reason}. If this machine is "
                "offline, copy yolox_nano.onnx (YOLOX release 0.1.1rc0) to "
                f"{target} or set SHOPLENS_DETECTOR_MODEL_PATH.") from exc
        if size != expected_size or digest.hexdigest() != expected_sha256:
            got = f"{size} bytes" if size > expected_size else f"{size} bytes, sha256 {digest.hexdigest()}"
            raise FetchError(
                f"downloaded file from {url} is not the pinned model: expected {expected_size} "
                f"bytes, sha256 {expected_sha256}; got {got}. Nothing was written to {target}.")
        os.replace(tmp, target)
        return target
    finally:
        tmp.unlink(missing_ok=True)


@command(failed=(FetchError,))
def main(argv: list[str] | None = None) -> int:
    """Download the filter's detector model file (YOLOX-Nano ONNX), verified against its pin"""
    ap = argument_parser("python -m dataset models fetch", __doc__.split("\n\n")[0])
    ap.add_argument("--url", help="default: settings.detector_model_url")
    ap.add_argument("--dest", help="default: settings.detector_model_path")
    args = parse_args(ap, argv)
    settings = Settings.from_env()
    path = fetch(args.url or settings.detector_model_url, args.dest or settings.detector_model_path)
    emit({"path": str(path), "sha256": PINNED_SHA256}, lambda r: f"detector model ready: {r['path']}")
    return 0
