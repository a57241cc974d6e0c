"""Several categories in one crawl process: what the nightly DAG maps over (category groups).

One child process crawls every category of its group at once (one interpreter, one reactor, the
imports and the run lookup paid once); together they keep the per-host budget, and each category
keeps its own outcome: its stats, its run-row entry, and a failure naming it.
"""
import pytest

import crawler
from crawler import CrawlError, worker
from crawler.replica import ReplicaShop
from crawler.run import category_groups, plan_groups
from shoplens.config import ConfigError, Settings

from test_crawl import query, stored_photos


def test_categories_are_dealt_into_the_configured_number_of_groups():
    ids = [f"1000000{i}" for i in range(6)]
    assert category_groups(ids, 2) == [ids[0::2], ids[1::2]]
    assert category_groups(ids, 10) == [[i] for i in ids]  # never an empty group
    assert sorted(sum(category_groups(ids, 4), [])) == sorted(ids)
    settings = Settings(categories=tuple(ids), crawl_parallelism=3)
    assert len(plan_groups(settings)) == 3  # default: one group per crawl slot
    assert plan_groups(settings.with_overrides(crawl_groups=1)) == [ids]
    with pytest.raises(ValueError):
        category_groups(ids, 0)
    with pytest.raises(ConfigError):
        Settings(crawl_groups=-1).validate()


@pytest.fixture
def slow_replica():
    """Six categories, every answer held 20 ms, so that requests pile up at the shop."""
    shop = ReplicaShop(seed=11, synthetic_products=4, synthetic_photos=(3, 6), latency=0.02)
    shop.start()
    yield shop
    shop.stop()


def test_one_process_crawls_every_category_of_its_group_within_the_per_host_budget(
        slow_replica, s3_settings, manifest_url):
    truth = slow_replica.ground_truth()
    categories = [c["id"] for c in truth["categories"]]
    assert len(categories) >= 2
    settings = s3_settings.with_overrides(
        manifest_url=manifest_url, shop_base_url=slow_replica.base_url,
        allowed_hosts=[slow_replica.cdn_url.split("://", 1)[1]], download_delay=0.0,
        autothrottle=False, concurrent_per_host=3, categories=categories)
    crawler.start_run(settings, "grouped")
    by_id = crawler.crawl_categories(settings, categories, "grouped")
    crawler.finish_run(settings, "grouped")

    assert list(by_id) == categories
    assert len({s["pid"] for s in by_id.values()}) == 1  # one crawl process for the group
    # ... forked from the warm crawl worker, not started cold.
    assert worker.worker_pid() is not None and by_id[categories[0]]["pid"] != worker.worker_pid()
    best = {c["id"]: c["product_ids_by_rank"][:settings.best_n] for c in truth["categories"]}
    for category_id, stats in by_id.items():
        assert stats["error"] is None and stats["products"] == len(best[category_id])
    expected = {r["id"] for r in truth["reviews"] if r["photo_id"] and r["bad"] is None
                and any(r["product_id"] in ids for ids in best.values())}
    assert set(stored_photos(manifest_url)) == expected
    assert sum(s["photos_stored"] for s in by_id.values()) == len(expected)
    # The categories crawled at once, yet the shop and its CDN never saw more than the budget.
    hosts = slow_replica.stats()["hosts"]
    assert sum(h["requests"] for h in hosts.values()) > 6 * len(categories)
    for host, seen in hosts.items():
        assert seen["max_in_flight"] <= settings.concurrent_per_host, host
    assert max(h["max_in_flight"] for h in hosts.values()) > 1
    # The shop's robots.txt once for the whole process, not once per category.
    assert slow_replica.stats()["requests"]["robots"] == 1
    # Each category's stats reached the run row.
    (row,) = query(manifest_url, "SELECT stats->'categories' FROM crawl_runs "
                                 "WHERE run_key = 'grouped'")[0]
    assert {c: row[c]["photos_stored"] for c in categories} == {
        c: by_id[c]["photos_stored"] for c in categories}


def test_a_lost_category_fails_its_group_by_name_and_the_others_are_still_crawled(
        replica_settings, small_replica, manifest_url):
    truth = small_replica.ground_truth()
    good = truth["categories"][0]["id"]
    settings = replica_settings.with_overrides(categories=[good, "99990000"])
    crawler.start_run(settings, "one-lost")
    with pytest.raises(CrawlError) as failed:
        crawler.crawl_categories(settings, [good, "99990000"], "one-lost")
    message = str(failed.value)
    assert "1 of 2 categories" in message and "category 99990000" in message
    assert f"category {good}:" not in message
    (row,) = query(manifest_url, "SELECT stats->'categories' FROM crawl_runs "
                                 "WHERE run_key = 'one-lost'")[0]
    assert row["99990000"]["products"] == 0 and "no product crawled" in row["99990000"]["error"]
    assert row[good]["error"] is None and row[good]["products"] > 0
    assert row[good]["photos_stored"] > 0


def test_crawls_one_after_another_in_one_caller_forked_or_started_cold(
        replica_settings, small_replica, manifest_url, monkeypatch):
    """Every crawl process is forked from the same preloaded worker (a second crawl in the same
    caller runs: a reactor cannot be restarted within one process); a caller that cannot fork
    from the worker (e.g. a daemonic process) starts ``python -m crawler`` instead."""
    truth = small_replica.ground_truth()
    first, second, third = (c["id"] for c in truth["categories"][:3])
    settings = replica_settings.with_overrides(categories=[first, second, third])
    crawler.start_run(settings, "twice")
    one = crawler.crawl_category(settings, first, "twice")
    two = crawler.crawl_category(settings, second, "twice")

    def cannot_fork(*args, **kwargs):
        raise worker.WorkerUnavailable("daemonic processes are not allowed to have children")

    monkeypatch.setattr(worker, "run_crawl_process", cannot_fork)
    cold = crawler.crawl_category(settings, third, "twice")
    assert len({one["pid"], two["pid"], cold["pid"]}) == 3
    assert all(s["error"] is None and s["photos_stored"] > 0 for s in (one, two, cold))
