"""Batches of a night's photos for the per-photo stages (a batch reads its photos ahead with
``ObjectStore.read_objects``).

A per-photo stage (dedup hashing, filter detection) is planned as ranges of sha256: the photos
still to do, in sha256 order, cut every ``size`` photos. Batch ``k`` covers every sha256 in
``[lo, hi)``, the first batch has no lower bound and the last no upper one, so the batches
partition the whole sha256 space: every photo falls in exactly one batch, also one stored after
planning. A batch is a small JSON-able dict (an Airflow XCom value per mapped task), not a list
of photos, so a million-photo night plans in a few kilobytes; a retried batch re-reads what in
its range is still to do, so it redoes only its own photos.

    batches = plan(shas_sorted, stage="filter", run_key=key, size=200, version=v)
    for item, data, error in store.read_objects(rows, key=lambda row: row.object_key):
        ...
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import sqlalchemy as sa

# Airflow's [core] max_map_length is 1024 by default: plan at most this many batches a night;
# beyond it batches grow instead.
MAX_BATCHES = 1000


@dataclass(frozen=True)
class Batch:
    """Photos of one stage and night with ``lo <= sha256 < hi`` (None: unbounded)."""

    stage: str
    run_key: str
    index: int
    count: int  # batches in the plan
    lo: str | None
    hi: str | None
    planned: int  # photos to do in the range when planned
    version: str  # the hash / detector version the plan was made for

    @property
    def label(self) -> str:
        return f"{self.stage} batch {self.index + 1}/{self.count}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, value: "Batch | dict") -> "Batch":
        """A batch from itself or from its :meth:`as_dict` form (what XCom hands a mapped task)."""
        return value if isinstance(value, Batch) else cls(**value)

    def where(self, column: sa.ColumnElement) -> sa.ColumnElement:
        """The SQL condition selecting this batch's range of ``column`` (a sha256 column)."""
        bounds = [sa.true()]
        if self.lo is not None:
            bounds.append(column >= self.lo)
        if self.hi is not None:
            bounds.append(column < self.hi)
        return sa.and_(*bounds)

    def covers(self, sha256: str) -> bool:
        return (self.lo is None or sha256 >= self.lo) and (self.hi is None or sha256 < self.hi)


def plan(shas: Sequence[str], *, stage: str, run_key: str, size: int, version: str,
         max_batches: int = MAX_BATCHES) -> list[Batch]:
    """Cut the sorted sha256s still to do into batches of ``size`` (more when that would exceed
    ``max_batches``); none when nothing is to do. The same input always gives the same plan."""
    if list(shas) != sorted(shas):
        raise ValueError("plan needs the sha256s in sorted order")
    if not shas:
        return []
    size = max(1, size, math.ceil(len(shas) / max_batches))
    starts = list(range(0, len(shas), size))
    bounds = [None] + [shas[s] for s in starts[1:]] + [None]
    return [Batch(stage, run_key, k, len(starts), bounds[k], bounds[k + 1],
                  min(size, len(shas) - start), version)
            for k, start in enumerate(starts)]
