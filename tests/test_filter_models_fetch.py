"""`python -m dataset models fetch`: verified, atomic download of the detector file."""
from __future__ import annotations

import functools
import hashlib
import http.server
import subprocess
import sys
import threading

import pytest

from shoplens.vision.models_fetch import PINNED_SHA256, PINNED_SIZE, FetchError, fetch
from shoplens.dev.services import free_port_block
from tests.conftest import REPO


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server over a folder the test fills; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port_block(1)), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_downloads_and_verifies_size_and_checksum(http_dir, tmp_path):
    served, base = http_dir
    payload = b"onnx-bytes" * 1000
    (served / "model.onnx").write_bytes(payload)
    dest = tmp_path / "cache" / "yolox_nano.onnx"
    got = fetch(f"{base}/model.onnx", dest, len(payload), hashlib.sha256(payload).hexdigest())
    assert got == dest and dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["yolox_nano.onnx"]  # no temp file left


def test_a_file_that_is_not_the_pinned_release_is_refused_and_nothing_is_written(http_dir, tmp_path):
    served, base = http_dir
    (served / "yolox_nano.onnx").write_bytes(b"not the model")
    dest = tmp_path / "cache" / "yolox_nano.onnx"
    with pytest.raises(FetchError, match=f"expected {PINNED_SIZE} bytes, sha256 {PINNED_SHA256}"):
        fetch(f"{base}/yolox_nano.onnx", dest)
    assert list(dest.parent.iterdir()) == []


def test_an_old_file_is_kept_when_the_new_download_fails(http_dir, tmp_path):
    served, base = http_dir
    dest = tmp_path / "yolox_nano.onnx"
    dest.write_bytes(b"previous")
    (served / "m.onnx").write_bytes(b"x" * 10)
    with pytest.raises(FetchError):
        fetch(f"{base}/m.onnx", dest, 11, "0" * 64)
    assert dest.read_bytes() == b"previous"


def test_offline_fetch_fails_with_a_clear_message(tmp_path):
    port = free_port_block(1)  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "dataset", "models", "fetch",
         "--url", f"http://127.0.0.1:{port}/yolox_nano.onnx", "--dest", str(tmp_path / "m.onnx")],
        cwd=REPO, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert "cannot download the detector model" in done.stderr and "offline" in done.stderr
    assert not (tmp_path / "m.onnx").exists()
