"""YOLOX-Nano (COCO) object detection with onnxruntime: letterbox, grid decoding and NMS.

The model file only maps a 416x416 BGR tensor to raw grid outputs; everything around it (resize,
decoding of the anchor-free grid, score threshold, non-maximum suppression, mapping boxes back to
the original image) is done here in numpy, so it can be tested against hand-computed tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from shoplens.photos import DECODER_VERSION, DEFAULT_LIMITS, PhotoLimits, decode_photo
from shoplens.checksums import file_sha256

INPUT_SIZE = 416
STRIDES = (8, 16, 32)
PAD_VALUE = 114
NMS_IOU = 0.45

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


class DetectorError(RuntimeError):
    """The detector model is missing or unusable."""


@dataclass(frozen=True)
class Box:
    """One detection in original-image pixels (x1, y1, x2, y2)."""

    label: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float

    def area_fraction(self, width: int, height: int) -> float:
        return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1) / float(width * height)

    def as_dict(self) -> dict:
        return {"label": self.label, "score": round(self.score, 4),
                "box": [round(self.x1, 1), round(self.y1, 1), round(self.x2, 1), round(self.y2, 1)]}

    @classmethod
    def from_dict(cls, d: dict) -> "Box":
        return cls(d["label"], float(d["score"]), *(float(v) for v in d["box"]))


def fit_for_model(image: Image.Image, original_size: tuple[int, int] | None = None,
                  size: int = INPUT_SIZE) -> tuple[Image.Image, float]:
    """The RGB image resized (aspect kept) to fit ``size`` x ``size``, and the scale factor
    (model pixels per original pixel). ``original_size`` is given when ``image`` was already
    decoded at a reduced size (JPEG draft mode)."""
    width, height = original_size or image.size
    scale = min(size / width, size / height)
    new_size = (max(1, int(width * scale)), max(1, int(height * scale)))
    rgb = image.convert("RGB")
    if rgb.size != new_size:
        rgb = rgb.resize(new_size, Image.BILINEAR, reducing_gap=3.0)
    return rgb, scale


def tensor_from_fitted(fitted: Image.Image | np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Pad bottom/right with 114 to ``size`` x ``size``; (1, 3, size, size) BGR float32."""
    pixels = np.asarray(fitted)
    height, width = pixels.shape[:2]
    tensor = np.full((1, 3, size, size), PAD_VALUE, dtype=np.float32)
    for channel in range(3):  # RGB -> BGR, written straight into the contiguous CHW layout
        tensor[0, channel, :height, :width] = pixels[:, :, 2 - channel]
    return tensor


def letterbox(image: Image.Image, size: int = INPUT_SIZE) -> tuple[np.ndarray, float]:
    """Resize keeping aspect, pad bottom/right with 114; returns the (1,3,size,size) BGR float
    tensor and the scale factor (model pixels per original pixel)."""
    fitted, scale = fit_for_model(image, size=size)
    return tensor_from_fitted(fitted, size), scale


def _grid(size: int = INPUT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Per-anchor grid cell (x, y) and stride, in the model's output order."""
    cells, strides = [], []
    for stride in STRIDES:
        n = size // stride
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full((n * n, 1), stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)


_GRID_CELLS, _GRID_STRIDES = _grid()


def decode(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw output (N, 85) -> boxes (N, 4) as x1,y1,x2,y2 in model pixels and scores (N, 80)."""
    if raw.shape != (len(_GRID_CELLS), 5 + len(COCO_CLASSES)):
        raise DetectorError(f"unexpected detector output shape {raw.shape}")
    return decode_rows(raw, np.arange(len(raw)))


def decode_rows(rows: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode the raw rows of the given anchor indices (see :func:`decode`)."""
    cells, strides = _GRID_CELLS[anchors], _GRID_STRIDES[anchors]
    centers = (rows[:, 0:2] + cells) * strides
    sizes = np.exp(rows[:, 2:4]) * strides
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
    return boxes, rows[:, 4:5] * rows[:, 5:]


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> list[int]:
    """Greedy non-maximum suppression; indices kept, best score first."""
    order = np.argsort(-scores, kind="stable")
    if len(order) > 1000:  # bound the IoU matrix's memory; row by row is the same algorithm
        keep: list[int] = []
        while order.size:
            keep.append(int(order[0]))
            order = order[1:][iou(boxes[order[0]], boxes[order[1:]]) <= iou_threshold]
        return keep
    return order[_greedy(_iou_matrix(boxes[order]) > iou_threshold)].tolist()


def _greedy(overlapping: np.ndarray) -> list[int]:
    """Positions kept by greedy suppression over boxes already sorted best first, given which
    pairs overlap: one IoU matrix instead of one IoU row per kept box."""
    suppressed = np.zeros(len(overlapping), dtype=bool)
    keep = []
    position = 0
    while position < len(overlapping):
        keep.append(position)
        suppressed |= overlapping[position]
        # Jump straight to the next box nothing kept so far overlaps.
        later = np.flatnonzero(~suppressed[position + 1:])
        if not later.size:
            break
        position += 1 + int(later[0])
    return keep


def per_class_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                  iou_threshold: float = NMS_IOU) -> np.ndarray:
    """:func:`nms` within each class (boxes of different classes never suppress each other);
    indices kept, best score first. One small IoU matrix per class present: cheaper than one
    matrix over every (box, class) pair, and exact."""
    order = np.lexsort((-scores, classes))  # grouped by class, best score first within each
    grouped = classes[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    kept = []
    for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(order)]):
        members = order[start:end]
        if len(members) > 1000:
            kept.append(members[nms(boxes[members], scores[members], iou_threshold)])
        else:
            kept.append(members[_greedy(_iou_matrix(boxes[members]) > iou_threshold)])
    kept_all = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return kept_all[np.argsort(-scores[kept_all], kind="stable")]


def _iou_matrix(b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(b[:, None, 0], b[None, :, 0])
    y1 = np.maximum(b[:, None, 1], b[None, :, 1])
    x2 = np.minimum(b[:, None, 2], b[None, :, 2])
    y2 = np.minimum(b[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)


def postprocess_arrays(raw: np.ndarray, min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode, keep (anchor, class) pairs above ``min_score``, per-class NMS: boxes (k, 4) in model
    pixels, scores (k,) and class indices (k,), best score first."""
    if raw.shape != (len(_GRID_CELLS), 5 + len(COCO_CLASSES)):
        raise DetectorError(f"unexpected detector output shape {raw.shape}")
    # score = objectness x class score <= objectness: most anchors are dropped before decoding.
    candidates = np.flatnonzero(raw[:, 4] >= min_score)
    boxes, scores = decode_rows(raw[candidates], candidates)
    rows, classes = np.nonzero(scores >= min_score)
    pair_boxes, pair_scores = boxes[rows], scores[rows, classes]
    kept = per_class_nms(pair_boxes, pair_scores, classes)
    return pair_boxes[kept], pair_scores[kept], classes[kept]


def _in_image_pixels(boxes: np.ndarray, scale: float, width: int, height: int) -> np.ndarray:
    xyxy = boxes / scale
    np.clip(xyxy[:, 0::2], 0.0, float(width), out=xyxy[:, 0::2])
    np.clip(xyxy[:, 1::2], 0.0, float(height), out=xyxy[:, 1::2])
    return xyxy


def postprocess(raw: np.ndarray, scale: float, width: int, height: int,
                min_score: float) -> list[Box]:
    """Decode, keep (anchor, class) pairs above ``min_score``, per-class NMS, back to image pixels."""
    boxes, scores, classes = postprocess_arrays(raw, min_score)
    xyxy = _in_image_pixels(boxes, scale, width, height)
    return [Box(COCO_CLASSES[c], s, *b) for b, s, c in
            zip(xyxy.tolist(), scores.tolist(), classes.tolist())]


def postprocess_dicts(raw: np.ndarray, scale: float, width: int, height: int,
                      min_score: float) -> list[dict]:
    """:func:`postprocess` as the stored JSON form (:meth:`Box.as_dict`), rounded in one numpy
    pass instead of one Python object per box (hundreds of boxes are stored per image)."""
    boxes, scores, classes = postprocess_arrays(raw, min_score)
    xyxy = np.round(_in_image_pixels(boxes, scale, width, height).astype(np.float64), 1).tolist()
    rounded = np.round(scores.astype(np.float64), 4).tolist()
    return [{"label": COCO_CLASSES[c], "score": s, "box": b}
            for b, s, c in zip(xyxy, rounded, classes.tolist())]


def model_version(model_path: str | Path) -> str:
    """The version naming the exact weights and decoder (:attr:`Detector.version`), without
    loading the model; :class:`DetectorError` when the file is missing."""
    path = Path(model_path).expanduser()
    if not path.is_file():
        raise DetectorError(
            f"detector model not found at {path}; run `python -m dataset models fetch` "
            "or set SHOPLENS_DETECTOR_MODEL_PATH")
    # Replacing the file or changing what the decoder returns re-inspects every image.
    return f"yolox_nano-{file_sha256(path)[:12]}+{DECODER_VERSION}"


class Detector:
    """An onnxruntime session over a YOLOX-Nano file; ``version`` names the exact weights."""

    def __init__(self, model_path: str | Path, min_score: float = 0.05, threads: int = 0):
        import onnxruntime as ort

        path = Path(model_path).expanduser()
        version = model_version(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
            raise DetectorError(f"cannot load detector model {path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.min_score = min_score
        self.version = version

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: tensor})[0][0]

    def detect(self, image: Image.Image, original_size: tuple[int, int] | None = None) -> list[Box]:
        """Boxes in original-image pixels; pass ``original_size`` for a draft-decoded image."""
        fitted, scale = fit_for_model(image, original_size)
        width, height = original_size or image.size
        raw = self.infer(tensor_from_fitted(fitted))
        return postprocess(raw, scale, width, height, self.min_score)

    def detect_fitted(self, fitted: Image.Image | np.ndarray, scale: float, width: int,
                      height: int) -> list[dict]:
        """Boxes (stored JSON form, see :meth:`Box.as_dict`) for an image already resized by
        :func:`fit_for_model` (PIL image or array)."""
        return postprocess_dicts(self.infer(tensor_from_fitted(fitted)), scale, width, height,
                                 self.min_score)


def open_for_model(data: bytes, size: int = INPUT_SIZE,
                   limits: PhotoLimits = DEFAULT_LIMITS) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB photo, a JPEG decoded at a reduced scale that still covers the model input
    (decoding full resolution only to shrink it is most of the non-inference cost), and its
    upright full-resolution size."""
    photo = decode_photo(data, limits, reduce_to=size)
    return photo.image, (photo.width, photo.height)
