"""The second near-duplicate signal: cosine similarity of photo embeddings, for the crops hashes miss.

Perceptual hashes are computed from the whole frame, so cutting 6-10 % off the sides of a photo
moves most of their bits; the core's photo embedding (:class:`shoplens.vision.embedding.Embedder`,
an ImageNet backbone's pooled features on the photo's centre crop, L2-normalised) barely moves.
An :class:`EmbeddingRule` adds a pair the hash rule missed when the two embeddings' cosine is at
least ``min_cosine`` *and* the hashes are still within a looser band (``max_hash_distance`` on
pHash + dHash): different photos of one product (what the shop mostly has: many customers
photograph the same product) often embed as close as a crop does, and the band is what keeps
them apart. Even so, the cosine of two shots of one product often reaches that of a crop, so
a candidate pair is then confirmed geometrically (``min_alignment``, :mod:`dataset.dedup.alignment`):
the two photos' grayscale thumbnails must align under a scale and shift (a crop is the same
pixels re-framed; another shot is not). Rule and defaults are measured in
``benchmarks/near_duplicates.py``.

Pure functions plus the embedder cache; the stage stores vectors and thumbnails in
``image_embeddings`` (float16 / uint8, one row per image, versioned by :func:`embedding_version`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dataset.dedup import alignment
from dataset.dedup.hashing import as_uint64, trim_uniform_border
from shoplens.config import Settings
from shoplens.photos import DECODER_VERSION

# Bumped whenever what an image embeds to could change for a given backbone and weights
# (preprocessing here or in the Embedder); rows with another version are recomputed.
EMBEDDING_SCHEME = f"dedup-embedding-v2;trim-border-v1;embedder-centre-crop;{alignment.THUMBNAIL_SCHEME}"
EMBED_CHUNK = 32  # photos embedded together (one backbone call)
VECTOR_DTYPE = np.float16  # stored: half the bytes, cosine error ~1e-3 (far below the rule's steps)


def embedding_version(settings: Settings) -> str:
    """What the stored vectors were computed with; another value recomputes them."""
    size = settings.dedup_embedding_image_size or "native"
    return (f"{EMBEDDING_SCHEME};{settings.dedup_embedding_backbone}@{size};"
            f"weights-{settings.model_init};{DECODER_VERSION}")


@dataclass(frozen=True)
class EmbeddingRule:
    """Near-duplicates by embedding: cosine >= ``min_cosine`` and pHash + dHash <= ``max_hash_distance``
    and (``min_alignment`` set) the two thumbnails' aligned correlation >= ``min_alignment``.

    As clusters (:func:`dataset.dedup.clusters.guarded_labels`) such a pair only *attaches*: it
    joins two clusters when the smaller has at most ``max_attach`` images and the two clusters'
    representatives pass the rule too; it never chains distinct photos of one product together.
    """
    min_cosine: float
    max_hash_distance: int
    max_attach: int = 3
    min_alignment: float | None = None  # None: no geometric check

    def __post_init__(self):
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"dedup embedding cosine must be within -1..1, got {self.min_cosine}")
        if not 0 <= self.max_hash_distance <= 128:
            raise ValueError(f"dedup embedding hash band must be within 0..128, got {self.max_hash_distance}")
        if self.max_attach < 1:
            raise ValueError(f"dedup embedding max attach must be at least 1, got {self.max_attach}")
        if self.min_alignment is not None and not -1.0 <= self.min_alignment <= 1.0:
            raise ValueError(f"dedup embedding alignment must be within -1..1, got {self.min_alignment}")

    @classmethod
    def from_settings(cls, settings: Settings) -> "EmbeddingRule | None":
        if not settings.dedup_embedding:
            return None
        alignment_check = settings.dedup_embedding_min_alignment
        return cls(settings.dedup_embedding_min_cosine, settings.dedup_embedding_max_hash_distance,
                   settings.dedup_embedding_max_attach, None if alignment_check <= -1 else alignment_check)

    def matches(self, cosine, hash_distance):
        return (np.asarray(cosine) >= self.min_cosine) & (np.asarray(hash_distance) <= self.max_hash_distance)

    def aligned(self, thumbnails: "Thumbnails | None", a: int, b: int) -> bool:
        """The geometric check of items ``a`` and ``b`` (always true without ``min_alignment``;
        false when either has no thumbnail)."""
        if self.min_alignment is None:
            return True
        correlation = None if thumbnails is None else thumbnails.correlation(a, b)
        return correlation is not None and correlation >= self.min_alignment

    def describe(self) -> str:
        check = "" if self.min_alignment is None else f" and aligned thumbnails >= {self.min_alignment:g}"
        return (f"cosine >= {self.min_cosine:g} and phash + dhash <= {self.max_hash_distance}{check}"
                f" (attaches <= {self.max_attach} images, checked against the representative)")


_EMBEDDERS: dict[tuple, object] = {}


def embedder_for(settings: Settings):
    """The untrained (ImageNet-feature) embedder the settings name; built once per process."""
    from shoplens.vision.embedding import Embedder  # TensorFlow: imported only when embedding

    key = (settings.dedup_embedding_backbone, settings.dedup_embedding_image_size, settings.model_init,
           settings.model_seed, settings.model_weights_dir)
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = Embedder(settings.dedup_embedding_backbone, settings.dedup_embedding_image_size,
                                   settings=settings)
    return _EMBEDDERS[key]


def square_of(settings: Settings, trimmed: Image.Image) -> np.ndarray:
    """uint8 (m, m, 3): the border-trimmed photo fitted to the embedder's margin square (what is
    kept of a photo until its chunk is embedded: a few hundred KB, whatever the photo's size)."""
    from shoplens.vision import images

    return images.fitted_square(trimmed, images.margin_size(embedder_for(settings).image_size))


def embed_squares(settings: Settings, squares: list[np.ndarray]) -> np.ndarray:
    """float32 (N, D) unit vectors of :func:`square_of` squares (the embedder's centre crop)."""
    embedder = embedder_for(settings)
    if not squares:
        return np.zeros((0, embedder.dim), np.float32)
    return embedder.project(embedder.features(embedder.centre_crops(np.stack(squares))))


def embed_images(settings: Settings, decoded: list[Image.Image]) -> np.ndarray:
    """float32 (N, D) unit vectors of upright RGB photos, border trimmed as for the hashes."""
    return embed_squares(settings, [square_of(settings, trim_uniform_border(img)) for img in decoded])


def to_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=VECTOR_DTYPE).tobytes()


class Thumbnails:
    """Items' thumbnails (None where absent) and their pairwise aligned correlation, memoised: the
    guard re-checks representative pairs, and a benchmark re-clusters the same pairs many times."""

    BATCH = 256  # pairs aligned together

    def __init__(self, items, positions=None, memo: dict | None = None):
        self.items = items if isinstance(items, np.ndarray) else list(items)
        self._positions = positions  # a view on some items of a larger set: local -> item position
        self._memo: dict[tuple[int, int], float | None] = {} if memo is None else memo

    def subset(self, positions) -> "Thumbnails":
        """The same thumbnails and memo, addressed by position within ``positions``."""
        return Thumbnails(self.items, np.asarray(positions, np.int64), self._memo)

    def __len__(self) -> int:
        return len(self._memo)

    def correlations(self, first, second) -> list[float | None]:
        """Aligned correlation of each pair (None where a thumbnail is missing), computed in batches."""
        if self._positions is not None:
            first, second = self._positions[np.asarray(first, np.int64)], self._positions[np.asarray(second, np.int64)]
        keys = [(min(int(a), int(b)), max(int(a), int(b))) for a, b in zip(first, second)]
        todo = []
        for key in dict.fromkeys(keys):
            if key not in self._memo:
                if self.items[key[0]] is None or self.items[key[1]] is None:
                    self._memo[key] = None
                else:
                    todo.append(key)
        for start in range(0, len(todo), self.BATCH):
            chunk = todo[start:start + self.BATCH]
            values = alignment.aligned_correlations(np.stack([self.items[a] for a, _ in chunk]),
                                                    np.stack([self.items[b] for _, b in chunk]))
            self._memo.update(zip(chunk, values.tolist()))
        return [self._memo[key] for key in keys]

    def correlation(self, a: int, b: int) -> float | None:
        return self.correlations([a], [b])[0]


def thumbnail_to_bytes(thumbnail: np.ndarray) -> bytes:
    return np.asarray(thumbnail, dtype=np.uint8).tobytes()


def thumbnail_from_bytes(data: bytes | None) -> np.ndarray | None:
    """The square uint8 thumbnail of a stored row (None when the row has none)."""
    if data is None:
        return None
    side = int(round(len(data) ** 0.5))
    return np.frombuffer(data, dtype=np.uint8).reshape(side, side)


def from_bytes(rows: list[bytes], dim: int) -> np.ndarray:
    """float32 (N, dim) unit vectors from stored rows (re-normalised after the float16 round trip)."""
    if not rows:
        return np.zeros((0, dim), np.float32)
    vectors = np.frombuffer(b"".join(rows), dtype=VECTOR_DTYPE).reshape(len(rows), dim).astype(np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class EmbeddingPairs:
    first: np.ndarray   # positions, first < second
    second: np.ndarray
    cosine: np.ndarray
    hash_distance: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def find_embedding_pairs(vectors: np.ndarray, phashes, dhashes, rule: EmbeddingRule,
                         query_positions=None, has_vector=None, thumbnails=None) -> EmbeddingPairs:
    """Pairs (among all items, or between ``query_positions`` and all) that ``rule`` accepts.

    Candidates come from an exact faiss inner-product range search (cosine >= ``min_cosine``);
    the hash band, then (``rule.min_alignment`` set) the aligned :class:`Thumbnails` decide. Items
    with ``has_vector`` false take no part.
    """
    import faiss

    n = len(vectors)
    has_vector = np.ones(n, bool) if has_vector is None else np.asarray(has_vector, bool)
    queries = (np.arange(n, dtype=np.int64) if query_positions is None
               else np.unique(np.asarray(query_positions, dtype=np.int64)))
    queries = queries[has_vector[queries]]
    indexed = np.flatnonzero(has_vector)
    empty = EmbeddingPairs(*(np.zeros(0, np.int64),) * 2, np.zeros(0, np.float32), np.zeros(0, np.int64))
    if len(queries) == 0 or len(indexed) < 2:
        return empty
    data = np.ascontiguousarray(vectors[indexed], dtype=np.float32)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    # faiss keeps results strictly above the radius; a hair below keeps "cosine >= min" inclusive.
    limits, _, found = index.range_search(np.ascontiguousarray(vectors[queries], dtype=np.float32),
                                          float(rule.min_cosine) - 1e-6)
    query = np.repeat(queries, np.diff(limits).astype(np.int64))
    found = found.astype(np.int64)
    item = indexed[found]
    low, high = np.minimum(query, item), np.maximum(query, item)
    keep = low != high
    key = np.unique(low[keep] * np.int64(n) + high[keep])
    low, high = np.divmod(key, np.int64(n))
    if len(low) == 0:
        return empty
    phashes, dhashes = as_uint64(phashes), as_uint64(dhashes)
    distance = (np.bitwise_count(phashes[low] ^ phashes[high]).astype(np.int64)
                + np.bitwise_count(dhashes[low] ^ dhashes[high]).astype(np.int64))
    cosine = np.einsum("ij,ij->i", vectors[low], vectors[high])
    ok = rule.matches(cosine, distance)
    if rule.min_alignment is not None:  # the costly check last, on what cosine and band left
        candidates = np.flatnonzero(ok)
        if thumbnails is not None:
            thumbnails.correlations(low[candidates], high[candidates])  # aligned in batches, memoised
        for k in candidates:
            ok[k] = rule.aligned(thumbnails, int(low[k]), int(high[k]))
    return EmbeddingPairs(low[ok], high[ok], cosine[ok].astype(np.float32), distance[ok])


def guarded_clusters(count: int, hash_pairs, extra: EmbeddingPairs, rule: EmbeddingRule, hash_threshold: int,
                     vectors: np.ndarray, phashes, dhashes, priority, has_vector=None,
                     trusted=None, thumbnails=None) -> np.ndarray:
    """Cluster labels the stage stores: hash pairs (and ``trusted`` (first, second) links, e.g. the
    stored clusters) as connected components, the embedding-only pairs ``extra`` under the guard of
    :func:`dataset.dedup.clusters.guarded_labels`: two representatives join when their hashes are
    within ``hash_threshold`` or ``rule`` accepts them (cosine and band, and aligned ``thumbnails``)."""
    from dataset.dedup.clusters import guarded_labels

    phashes, dhashes = as_uint64(phashes), as_uint64(dhashes)
    has_vector = np.ones(count, bool) if has_vector is None else np.asarray(has_vector, bool)

    def joins(a: int, b: int) -> bool:
        distance = (int(np.bitwise_count(phashes[a] ^ phashes[b])) + int(np.bitwise_count(dhashes[a] ^ dhashes[b])))
        if distance <= hash_threshold:
            return True
        return bool(has_vector[a] and has_vector[b] and rule.matches(float(vectors[a] @ vectors[b]), distance)
                    and rule.aligned(thumbnails, a, b))

    first, second = [np.asarray(hash_pairs.first, np.int64)], [np.asarray(hash_pairs.second, np.int64)]
    if trusted is not None:
        first.append(np.asarray(trusted[0], np.int64))
        second.append(np.asarray(trusted[1], np.int64))
    return guarded_labels(count, np.concatenate(first), np.concatenate(second), extra.first, extra.second,
                          extra.cosine, priority, joins, rule.max_attach)
