"""The core: configuration, manifest migrations, the content-addressed object store and the run
summary."""
import hashlib
import json
from collections import Counter

import pytest
import sqlalchemy as sa

from shoplens import summary
from shoplens.config import ConfigError, Settings
from shoplens.manifest.db import current_revision, engine_for, upgrade
from shoplens.store import ObjectReadError, ObjectStore, image_key


def test_settings_come_from_environment(monkeypatch):
    monkeypatch.setenv("SHOPLENS_SHOP_BASE_URL", "https://store.ohou.se/")
    monkeypatch.setenv("SHOPLENS_CATEGORIES", "10120000, 13020000")
    monkeypatch.setenv("SHOPLENS_BEST_N", "5")
    s = Settings.from_env()
    assert s.shop_base_url == "https://store.ohou.se"
    assert s.categories == ("10120000", "13020000")
    assert s.best_n == 5


@pytest.mark.parametrize("name,value,message", [
    ("BEST_N", "twenty", "must be an integer"),
    ("CATEGORIES", "beds", "category ids are digits"),
    ("SHOP_BASE_URL", "ftp://x", r"http\(s\) URL"),
    ("S3_SECURE", "maybe", "must be a boolean"),
])
def test_bad_settings_are_rejected_with_a_clear_message(monkeypatch, name, value, message):
    monkeypatch.setenv(f"SHOPLENS_{name}", value)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env()


def test_overrides_from_params_replace_fields_and_keep_the_rest():
    s = Settings().with_overrides(categories="10120000,16220000", best_n=3, photo_cap_per_product=None)
    assert s.categories == ("10120000", "16220000") and s.best_n == 3
    assert s.photo_cap_per_product == Settings().photo_cap_per_product
    with pytest.raises(ConfigError, match="unknown setting"):
        Settings().with_overrides(nonsense=1)
    assert Settings().public_dict()["s3_secret_key"] == "***"


def test_the_shop_profile_sets_the_base_url_and_its_photo_hosts_together():
    """SHOPLENS_SHOP picks the base URL and the CDN hosts as one: the real shop's profile allows
    the hosts its review photos come from (none of the replica's), the default stays the replica,
    an explicit base URL or host list still wins, and an unknown profile is refused."""
    real = Settings.from_env({"SHOPLENS_SHOP": "ohouse"})
    assert real.shop_base_url == "https://store.ohou.se"
    assert {"prs.ohouse.com", "image.ohousecdn.com", "prs.ohousecdn.com"} <= set(real.allowed_hosts)
    assert "127.0.0.1:8612" not in real.allowed_hosts
    replica = Settings.from_env({})
    assert (replica.shop, replica.shop_base_url, replica.allowed_hosts) == (
        "replica", "http://127.0.0.1:8611", ("127.0.0.1:8612",))
    assert Settings().with_overrides(shop="ohouse").allowed_hosts == real.allowed_hosts
    mirrored = Settings.from_env({"SHOPLENS_SHOP": "ohouse", "SHOPLENS_ALLOWED_HOSTS": "cdn.example"})
    assert mirrored.allowed_hosts == ("cdn.example",) and mirrored.shop_base_url == real.shop_base_url
    with pytest.raises(ConfigError, match="SHOPLENS_SHOP must be one of .*'ohouse'"):
        Settings.from_env({"SHOPLENS_SHOP": "ohou.se"})


def test_public_settings_hold_no_secret_anywhere():
    """What crawl_runs.settings and dataset versions store (``public_dict``) keeps no password,
    secret, key or token: secret-named fields are masked, URLs lose their password (the manifest
    URL's included) and secret-named query values, and non-secret settings are unchanged."""
    import json

    settings = Settings().with_overrides(
        manifest_url="postgresql+psycopg2://shoplens:manifest-pw-1@postgres:5432/shoplens",
        s3_access_key="access-id-2", s3_secret_key="s3-secret-3",
        detector_model_url="https://mirror:mirror-pw-4@models.example/yolox_nano.onnx?token=tok-5&v=2",
        alert_webhook_url="https://hooks.example/services/T0/B0/hook-token-6")
    public = settings.public_dict()
    stored = json.dumps(public)
    for secret in ("manifest-pw-1", "access-id-2", "s3-secret-3", "mirror-pw-4", "tok-5", "hook-token-6"):
        assert secret not in stored
    assert public["manifest_url"] == "postgresql+psycopg2://shoplens:***@postgres:5432/shoplens"
    assert public["detector_model_url"] == "https://mirror:***@models.example/yolox_nano.onnx?token=***&v=2"
    assert public["shop_base_url"] == settings.shop_base_url
    assert public["detector_model_path"] == settings.detector_model_path
    assert public["categories"] == list(settings.categories)


def test_migrations_create_the_manifest_and_are_idempotent(fresh_database):
    upgrade(fresh_database)
    upgrade(fresh_database)  # a second run changes nothing
    assert current_revision(fresh_database) is not None
    tables = set(sa.inspect(engine_for(fresh_database)).get_table_names())
    assert {"crawl_runs", "categories", "products", "product_ranks", "reviews", "images",
            "review_photos", "crawl_failures"} <= tables


def test_images_table_rejects_rows_that_cannot_be_valid(manifest_url):
    with engine_for(manifest_url).connect() as conn:
        with pytest.raises(sa.exc.IntegrityError):
            conn.execute(sa.text(
                "INSERT INTO images (sha256, object_key, size_bytes, width, height, format, source_url,"
                " review_id, product_id, first_seen_run) VALUES ('nothex', 'k', 1, 1, 1, 'jpeg', 'u', 1, 1, 1)"))


def test_images_are_stored_once_under_their_content_address(s3_settings):
    store = ObjectStore(s3_settings)
    data = b"\xff\xd8 not really a jpeg but bytes are bytes"
    key, new = store.put_image(data, "jpeg")
    digest = hashlib.sha256(data).hexdigest()
    assert key == image_key(digest, "jpeg") == f"images/{digest[:2]}/{digest}.jpg"
    assert new is True
    assert store.put_image(data, "jpeg") == (key, False)
    assert store.get_bytes(key) == data
    assert list(store.list_keys("images/")) == [key]


def test_the_local_store_runs_one_go_scheduler_thread_unless_told_otherwise(seaweedfs):
    # One thread costs the store about a quarter less CPU per GET on 2 cores it shares with the
    # workers (benchmarks/store_get.py); the process's environment is what Go reads.
    from pathlib import Path

    environ = Path(f"/proc/{seaweedfs.pid}/environ").read_bytes().split(b"\0")
    assert seaweedfs.go_max_procs == 1
    assert b"GOMAXPROCS=1" in environ


def test_a_store_on_chosen_ports_starts_on_others_when_one_is_taken_before_it_binds(
        tmp_path, monkeypatch):
    # Two test workers choose free ports at the same moment: the block found free can be taken
    # before weed binds it. The first block offered here has its master port already listening.
    import socket

    from shoplens.dev import services

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken_block = busy.getsockname()[1]
    free_block = services.free_port_block(services.SEAWEED_PORTS)
    offered = iter([taken_block, free_block])
    monkeypatch.setattr(services, "free_port_block", lambda count: next(offered))
    weed = services.SeaweedFS(tmp_path / "weed", 0, "ports-key", "ports-secret-key")
    try:
        weed.start()
        assert weed.base_port == free_block
        assert services.PORT_TAKEN in (tmp_path / "weed" / "weed.log").read_bytes()
    finally:
        weed.stop()
        busy.close()


def test_a_store_given_its_ports_does_not_move_to_others(tmp_path):
    import socket

    from shoplens.dev import services

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    weed = services.SeaweedFS(tmp_path / "weed", busy.getsockname()[1], "k", "secret-key-1")
    try:
        with pytest.raises(RuntimeError, match="before port"):
            weed.start(timeout=30)
        assert weed.base_port == busy.getsockname()[1]
    finally:
        weed.stop()
        busy.close()


def test_signed_reads_return_the_stored_bytes_from_any_thread_and_name_a_missing_key(s3_settings):
    from concurrent.futures import ThreadPoolExecutor

    store = ObjectStore(s3_settings)
    objects = {f"images/ab/{n} odd+name.jpg": bytes([n]) * (1000 + 70_000 * n) for n in range(6)}
    for key, data in objects.items():
        store.put_bytes(key, data)
    with ThreadPoolExecutor(3) as pool:  # reads reuse one connection per thread
        assert list(pool.map(store.read_object, [*objects] * 3)) == [*objects.values()] * 3
    with pytest.raises(ObjectReadError) as missing:
        store.read_object("images/ab/absent.jpg")
    assert (missing.value.status, missing.value.code) == (404, "NoSuchKey")
    wrong = ObjectStore(s3_settings.with_overrides(s3_secret_key="not-the-key"))
    with pytest.raises(ObjectReadError) as refused:
        wrong.read_object(next(iter(objects)))
    assert refused.value.status == 403


def test_signed_writes_store_bytes_any_client_reads_back_and_name_a_refusal(s3_settings):
    """``write_object`` (the crawler's photo PUT) stores what the minio client then reads, from
    any thread, with the payload hash given or computed; a refused PUT is an
    ``ObjectWriteError`` with the S3 status and code; its connection outlives a server's close."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    from shoplens.store import ObjectWriteError

    store = ObjectStore(s3_settings)
    objects = {f"images/ef/{n} odd+name.jpg": bytes([n]) * (700 + 90_000 * n) for n in range(6)}

    def write(item):
        key, data = item
        given = hashlib.sha256(data).hexdigest() if len(data) % 2 else None
        store.write_object(key, data, "image/jpeg", sha256=given)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(write, objects.items()))
    for key, data in objects.items():
        assert store.get_bytes(key) == data
        assert store.client.stat_object(store.bucket, key).content_type == "image/jpeg"
    refused = ObjectStore(s3_settings.with_overrides(s3_secret_key="not-the-key"))
    with pytest.raises(ObjectWriteError) as denied:
        refused.write_object("images/ef/denied.jpg", b"x", "image/jpeg")
    assert denied.value.status == 403 and not store.exists("images/ef/denied.jpg")
    store.write_object("images/ef/before.jpg", b"before", "image/jpeg")
    store._signed_writes._local.conn[0].close()  # this thread's connection, broken while idle
    store.write_object("images/ef/after.jpg", b"after", "image/jpeg")
    assert store.read_object("images/ef/after.jpg") == b"after"


def test_pipelined_reads_answer_each_item_in_order_and_a_missing_key_fails_only_itself(s3_settings):
    store = ObjectStore(s3_settings)
    objects = {f"images/cd/{n}.jpg": bytes([n]) * (500 + 40_000 * (n % 3)) for n in range(20)}
    for key, data in objects.items():
        store.put_bytes(key, data)
    keys = [*objects][:7] + ["images/cd/absent.jpg"] + [*objects][7:]
    answers = list(store.read_objects([(k,) for k in keys], key=lambda item: item[0], in_flight=4))
    assert [item[0] for item, _, _ in answers] == keys
    for (key,), data, error in answers:
        if key == "images/cd/absent.jpg":
            assert data is None and (error.status, error.code) == (404, "NoSuchKey")
        else:
            assert error is None and data == objects[key]
    # A caller that stops early leaves no unread answer behind for the thread's next read.
    reads = store.read_objects([*objects], in_flight=8)
    next(reads), next(reads)
    reads.close()
    assert store.read_object("images/cd/19.jpg") == objects["images/cd/19.jpg"]


class _PickyServer:
    """A local HTTP/1.1 server that answers pipelined GETs with the path as the body, chunked
    for paths with "chunked", and ends every connection after ``per_connection`` answers (the
    last one saying ``Connection: close``), dropping the requests it has not answered."""

    def __init__(self, per_connection: int):
        import socket
        import threading

        self.per_connection, self.connections = per_connection, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import socket

        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn, conn.makefile("rb") as reader:
                for answered in range(1, self.per_connection + 1):
                    request = reader.readline()
                    if not request:
                        break
                    while reader.readline() not in (b"\r\n", b""):
                        pass
                    path = request.split()[1]
                    last = answered == self.per_connection
                    head = b"HTTP/1.1 200 OK\r\n" + (b"Connection: close\r\n" if last else b"")
                    if b"chunked" in path:
                        half = len(path) // 2
                        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                                        for part in (path[:half], path[half:])) + b"0\r\n\r\n"
                        conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + body)
                    else:
                        conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(path) + path)
                # A graceful close, as HTTP servers do it (lingering close): closing with
                # requests unread would reset the connection and could destroy the last answer
                # before the client reads it.
                conn.shutdown(socket.SHUT_WR)
                while reader.read(65536):
                    pass

    def close(self):
        self.listener.close()


def test_pipelined_reads_survive_a_server_that_closes_connections_and_sends_chunked_bodies():
    server = _PickyServer(per_connection=3)
    try:
        store = ObjectStore(Settings().with_overrides(s3_endpoint=server.endpoint, s3_bucket="b"))
        keys = [f"k{n}" + ("-chunked" if n % 2 else "") for n in range(10)]
        answers = list(store.read_objects(keys, in_flight=5))
        assert [(item, data, error) for item, data, error in answers] == [
            (key, f"/b/{key}".encode(), None) for key in keys]
        assert server.connections == 4  # 10 answers, 3 per connection
        assert store.read_object("after") == b"/b/after"
    finally:
        server.close()


def test_parallel_crawls_share_the_politeness_budget_instead_of_multiplying_it():
    s = Settings().with_overrides(concurrent_per_host=4, download_delay=0.4)
    share = s.share_of_shop(2)
    assert share.concurrent_per_host * 2 <= s.concurrent_per_host
    # two crawls each waiting 0.8 s between requests ask at the rate of one waiting 0.4 s
    assert share.download_delay == pytest.approx(0.8)
    assert s.share_of_shop(1) == s
    with pytest.raises(ConfigError, match="cannot be shared"):
        s.share_of_shop(5)


@pytest.fixture
def seeded_manifest(manifest_url):
    import ui_manifest

    ui_manifest.seed(manifest_url)
    with engine_for(manifest_url).connect() as conn:
        yield conn


def test_run_summary_has_every_stage_of_a_night_with_one_name_per_count(seeded_manifest):
    """One night's summary, recounted from the manifest: crawl, dedup, filter, the version it
    built and the models trained on it, the recorded stages and the night's own row."""
    import ui_manifest as m

    s = summary.load(seeded_manifest, m.NIGHT1)
    assert (s.found, s.status, s.duration_seconds, s.failed_stages) == (True, "success", 200, [])
    assert list(s.stages) == ["crawl:10120000", "filter"]
    assert s.stages["crawl:10120000"]["volume"] == {"photos_stored": 18}
    photos = len(m.PHOTO_PRODUCT)
    assert {k: s.crawl[k] for k in ("status", "categories", "reviews_new", "images_new",
                                    "images_total", "failures")} == {
        "status": "success", "categories": 2, "reviews_new": photos, "images_new": photos,
        "images_total": photos, "failures": {}}
    assert s.crawl["image_bytes_new"] == sum(len(m.jpeg(i)) for i in range(photos))
    rejected = {i for i in m.FAILED_RULES}
    per_rule = Counter(rule for rules in m.FAILED_RULES.values() for rule in rules)
    assert {k: s.filter[k] for k in ("status", "decided", "kept_images", "rejected_images",
                                     "rejected_by_rule")} == {
        "status": "success", "decided": photos, "kept_images": photos - len(rejected),
        "rejected_images": len(rejected), "rejected_by_rule": dict(per_rule)}
    assert list(s.filter["rejected_by_rule"]) == [r for r, _ in per_rule.most_common()]
    splits = Counter(m.V1.values())
    assert {k: s.build[k] for k in ("built", "version_id", "status", "images", "labels", "splits")} == {
        "built": True, "version_id": "v0001", "status": "complete", "images": len(m.V1),
        "labels": len({m.PHOTO_PRODUCT[i] for i in m.V1}),
        "splits": {split: splits[split] for split in ("train", "val", "test")}}
    [model] = s.training
    assert (model["model_id"], model["top1"], model["top3"], model["promoted"]) == ("m1", 0.80, 0.95, True)
    assert s.volume()["filter.rejected_images"] == len(rejected)
    assert "crawl.run_id" not in s.volume()  # ids are not volume

    text = s.text()
    assert f"filter: success; 0 inspected (0 unreadable), {photos} decided: kept " \
           f"{photos - len(rejected)}, rejected {len(rejected)}" in text
    assert "training: model m1 complete: ensemble test Top-1 80.0%, Top-3 95.0% (n=2); " \
           "promoted: first model" in text
    assert json.loads(json.dumps(s.as_dict()))["build"]["version_id"] == "v0001"


def test_a_night_whose_build_failed_is_failed_and_an_unknown_run_is_not_found(seeded_manifest):
    import ui_manifest as m

    night2 = summary.load(seeded_manifest, m.NIGHT2)  # its latest attempt, v0003, failed
    assert night2.status == "failed" and night2.filter is None
    assert (night2.build["version_id"], night2.build["status"]) == ("v0003", "failed")
    assert night2.training == [] and "   filter: did not run" in night2.lines()
    unknown = summary.load(seeded_manifest, "manual__never")
    assert not unknown.found and unknown.text().endswith("nothing recorded for this run key")
