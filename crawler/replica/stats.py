"""What the replica measures about its visitors, politeness first.

Per host (the shop and the CDN listen on different ports, so they are different hosts): the most
requests in flight at once, the average number in flight while any is (how well a client keeps its
allowed concurrency busy), and the smallest gap between two request starts. Sub-resources a
browser loads by itself with a page (``/_next/static/``, ``/favicon.ico``) are counted but left
out of the politeness numbers: they arrive together by design, the crawler does not pace them.
Requests sent by the harness with header ``X-Replica-Admin: 1`` are not counted at all.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

ROBOTS_DISALLOW = ("/__replica/", "/exhibitions/", "/api/goods/reviews/export")
BROWSER_SUBRESOURCES = ("/_next/static/", "/favicon.ico")


def is_disallowed(path: str) -> bool:
    return any(path.startswith(prefix) for prefix in ROBOTS_DISALLOW)


@dataclass
class HostStats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    last_start: float | None = None
    min_gap_s: float | None = None
    busy_s: float = 0.0             # time with at least one request in flight
    in_flight_s: float = 0.0        # integral of in_flight over time
    last_change: float | None = None

    def account(self, now: float) -> None:
        """Add the time since the last start or end, at the in-flight count it had."""
        if self.last_change is not None and self.in_flight:
            self.busy_s += now - self.last_change
            self.in_flight_s += (now - self.last_change) * self.in_flight
        self.last_change = now


@dataclass
class Stats:
    clock: object = time.monotonic
    by_kind: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    blocked: Counter = field(default_factory=Counter)
    disallowed_hits: int = 0
    disallowed_paths: list[str] = field(default_factory=list)
    hosts: dict[str, HostStats] = field(default_factory=dict)
    user_agents: Counter = field(default_factory=Counter)

    def begin(self, host: str, path: str, kind: str, user_agent: str) -> HostStats | None:
        """Count a request start; returns the host record to pass to :meth:`end` (or None)."""
        self.by_kind[kind] += 1
        self.user_agents[user_agent[:120]] += 1
        if is_disallowed(path):
            self.disallowed_hits += 1
            if len(self.disallowed_paths) < 100:
                self.disallowed_paths.append(path)
        if path.startswith(BROWSER_SUBRESOURCES):
            return None
        record = self.hosts.setdefault(host, HostStats())
        now = self.clock()
        if record.last_start is not None:
            gap = now - record.last_start
            record.min_gap_s = gap if record.min_gap_s is None else min(record.min_gap_s, gap)
        record.last_start = now
        record.requests += 1
        record.account(now)
        record.in_flight += 1
        record.max_in_flight = max(record.max_in_flight, record.in_flight)
        return record

    def end(self, record: HostStats | None) -> None:
        if record is not None:
            record.account(self.clock())
            record.in_flight -= 1

    def snapshot(self) -> dict:
        return {
            "requests": dict(self.by_kind),
            "total_requests": sum(self.by_kind.values()),
            "status": {str(k): v for k, v in self.by_status.items()},
            "faults": dict(self.faults),
            "blocked": dict(self.blocked),
            "disallowed_hits": self.disallowed_hits,
            "disallowed_paths": list(self.disallowed_paths),
            "hosts": {host: {"requests": h.requests, "max_in_flight": h.max_in_flight,
                             "in_flight": h.in_flight, "min_gap_s": h.min_gap_s,
                             "busy_s": round(h.busy_s, 3), "in_flight_s": round(h.in_flight_s, 3),
                             "mean_in_flight_while_busy": round(h.in_flight_s / h.busy_s, 3)
                             if h.busy_s else None}
                      for host, h in self.hosts.items()},
            "user_agents": dict(self.user_agents),
        }
