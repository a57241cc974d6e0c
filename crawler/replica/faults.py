"""Transient faults (``--faults 500=0.05,hang=0.01`` or ``all=0.1``), drawn per request.

The draw for the n-th request of a URL is a pure function of (seed, URL, n): runs are reproducible
whatever the interleaving, and a retry of the same URL draws afresh, so it can succeed.
``all=F`` makes a request fault with probability F, the kind picked evenly among the kinds that
apply to its endpoint; a named kind's fraction applies to every endpoint the kind can hit.
"""
from __future__ import annotations

import random
from collections import defaultdict

KINDS = ("500", "429", "hang", "truncate", "html", "corrupt", "offsite")
# Not transient and not part of ``all``: a share of products with malformed data (hostile.py).
HOSTILE = "hostile-data"
# Which faults each kind of endpoint can show. HTML pages (they carry the WAF script) only 500.
APPLICABLE = {
    "json": ("500", "429", "hang", "truncate", "html"),
    "page": ("500",),
    "image": ("500", "429", "hang", "truncate", "corrupt", "offsite"),
}


class FaultSpecError(ValueError):
    """A --faults spec the replica cannot read."""


def parse_spec(spec: str | None) -> dict[str, float]:
    """``"500=0.1,hang=0.02"`` -> {"500": 0.1, "hang": 0.02}; ``all`` is kept as a key."""
    fractions: dict[str, float] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        kind, sep, raw = item.partition("=")
        kind = kind.strip()
        if not sep or (kind not in KINDS and kind not in ("all", HOSTILE)):
            raise FaultSpecError(f"--faults item {item!r}: expected kind=fraction with kind one of "
                                 f"{', '.join(KINDS)}, {HOSTILE} or all")
        try:
            value = float(raw)
        except ValueError:
            raise FaultSpecError(f"--faults item {item!r}: {raw!r} is not a number") from None
        if not 0.0 <= value <= 1.0:
            raise FaultSpecError(f"--faults item {item!r}: fraction must be in [0, 1]")
        fractions[kind] = value
    return fractions


class FaultPlan:
    def __init__(self, spec: str | None = "", seed: int = 0):
        fractions = parse_spec(spec)
        self.spec = spec or ""
        self.seed = seed
        self.hostile_fraction = fractions.get(HOSTILE, 0.0)
        self.per_surface: dict[str, list[tuple[str, float]]] = {}
        for surface, kinds in APPLICABLE.items():
            shared = fractions.get("all", 0.0) / len(kinds)
            table = [(kind, fractions.get(kind, shared)) for kind in kinds]
            total = sum(p for _, p in table)
            if total > 1.0 + 1e-9:
                raise FaultSpecError(f"--faults {spec!r}: fractions for {surface} endpoints add up "
                                     f"to {total:.2f} > 1")
            self.per_surface[surface] = [(k, p) for k, p in table if p > 0]
        self._attempts: dict[str, int] = defaultdict(int)

    @property
    def active(self) -> bool:
        return any(self.per_surface.values()) or self.hostile_fraction > 0

    def draw(self, surface: str, url: str) -> str | None:
        """The fault for this request of ``url`` on a ``surface`` endpoint, or None."""
        table = self.per_surface.get(surface)
        if not table:
            return None
        attempt = self._attempts[url]
        self._attempts[url] = attempt + 1
        u = random.Random(f"fault:{self.seed}:{url}:{attempt}").random()
        for kind, fraction in table:
            if u < fraction:
                return kind
            u -= fraction
        return None
