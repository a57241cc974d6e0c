"""Deterministic, stable train/val/test splits that never separate a near-duplicate cluster.

Rules, in order:
1. A cluster (near-duplicate group from dedup; a singleton is its own cluster) is one unit: all of
   its members get the same split, so no test photo has a near-copy in train.
2. An image that was in an earlier complete version keeps the split it had there. If dedup has
   since merged clusters whose images had different splits, the cluster takes the split most of
   its earlier images had (ties: train, then val, then test) and the moved images are reported.
3. New clusters are taken in the order of a seeded hash of their cluster id and each one goes to
   the split that is furthest below its target share for the product(s) of its images. The hash
   makes the order reproducible and unrelated to crawl order; the quota keeps every product's
   split shares close to the targets, so every label gets train photos first.
Exact fractions are used so that ties are decided the same way on every machine.
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Mapping, Sequence

from shoplens.config import ConfigError, Settings
from shoplens.export_layout import SPLITS


@dataclass(frozen=True)
class SplitRatios:
    train: Fraction
    val: Fraction
    test: Fraction

    @classmethod
    def from_settings(cls, settings: Settings) -> "SplitRatios":
        return cls.parse(settings.dataset_train_ratio, settings.dataset_val_ratio,
                         settings.dataset_test_ratio)

    @classmethod
    def parse(cls, train: float, val: float, test: float) -> "SplitRatios":
        values = [Fraction(str(v)) for v in (train, val, test)]
        if any(v <= 0 for v in values):
            raise ConfigError(f"split ratios must all be > 0, got train={train} val={val} test={test}")
        if sum(values) != 1:
            raise ConfigError(f"split ratios must sum to 1, got {float(sum(values))}")
        return cls(*values)

    def of(self, split: str) -> Fraction:
        return getattr(self, split)

    def as_dict(self) -> dict[str, float]:
        return {s: float(self.of(s)) for s in SPLITS}


@dataclass(frozen=True)
class SplitCandidate:
    sha256: str
    product_id: int
    cluster_id: str


@dataclass
class SplitAssignment:
    splits: dict[str, str]
    kept: int = 0          # images that kept their earlier split
    new: int = 0           # images assigned for the first time
    inherited: int = 0     # new images that followed their cluster's earlier split
    # (sha256, earlier split, new split) for images moved to join their merged cluster's split
    moved: list[tuple[str, str, str]] = field(default_factory=list)


def seeded_key(seed: str, key: str) -> str:
    """A reproducible pseudo-random ordering key for ``key``."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


def assign_splits(candidates: Sequence[SplitCandidate], previous: Mapping[str, str],
                  ratios: SplitRatios, seed: str,
                  cluster_history: Mapping[str, Mapping[str, int]] | None = None) -> SplitAssignment:
    """Split of every candidate.

    ``previous`` maps sha256 -> split from earlier versions. ``cluster_history`` maps a cluster
    id -> {split: images} for earlier members of that cluster that are not candidates now (e.g.
    a former representative that dedup has since marked a duplicate): a new image joining such a
    cluster follows the cluster's earlier split, so it cannot land opposite its near-copy.
    """
    cluster_history = cluster_history or {}
    clusters: dict[str, list[SplitCandidate]] = defaultdict(list)
    for candidate in candidates:
        clusters[candidate.cluster_id].append(candidate)

    result = SplitAssignment(splits={})
    per_product: dict[int, Counter] = defaultdict(Counter)
    new_clusters: list[str] = []
    for cluster_id in sorted(clusters):
        members = clusters[cluster_id]
        earlier = Counter(previous[m.sha256] for m in members if m.sha256 in previous)
        if not earlier:
            earlier = Counter({s: n for s, n in cluster_history.get(cluster_id, {}).items() if n})
        if not earlier:
            new_clusters.append(cluster_id)
            continue
        chosen = max(SPLITS, key=lambda s: (earlier[s], -SPLITS.index(s)))
        for member in sorted(members, key=lambda m: m.sha256):
            _place(result, per_product, member, chosen)
            before = previous.get(member.sha256)
            if before is None:
                result.new += 1
                result.inherited += 1
            elif before == chosen:
                result.kept += 1
            else:
                result.moved.append((member.sha256, before, chosen))

    for cluster_id in sorted(new_clusters, key=lambda c: seeded_key(seed, c)):
        members = clusters[cluster_id]
        images_of_product = Counter(m.product_id for m in members)
        chosen = max(SPLITS, key=lambda s: (
            _deficit(s, images_of_product, per_product, ratios), -SPLITS.index(s)))
        for member in members:
            _place(result, per_product, member, chosen)
            result.new += 1
    return result


def _place(result: SplitAssignment, per_product: dict[int, Counter], member: SplitCandidate,
           split: str) -> None:
    result.splits[member.sha256] = split
    per_product[member.product_id][split] += 1


def _deficit(split: str, adding: Mapping[int, int], per_product: Mapping[int, Counter],
             ratios: SplitRatios) -> Fraction:
    """How far ``split`` would be below its target share, summed over the products involved."""
    total = Fraction(0)
    for product_id, count in adding.items():
        counts = per_product.get(product_id, Counter())
        size_after = sum(counts.values()) + count
        total += ratios.of(split) * size_after - counts[split]
    return total


def clusters_spanning_splits(rows: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """``{cluster_id: splits}`` for clusters found in more than one split; rows are (cluster, split)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for cluster_id, split in rows:
        seen[cluster_id].add(split)
    return {c: s for c, s in seen.items() if len(s) > 1}
