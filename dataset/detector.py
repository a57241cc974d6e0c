"""YOLOX-Nano (COCO) object detection with onnxruntime: letterbox, grid decoding and NMS.

The model file only maps a 416x416 BGR tensor to raw grid outputs; everything around it (resize,
decoding of the anchor-free grid, score threshold, non-maximum suppression, mapping boxes back to
the original image) is done here in numpy, so it can be tested against hand-computed tensors.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

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


def letterbox(image: Image.Image, size: int = INPUT_SIZE) -> tuple[np.ndarray, float]:
    """Resize keeping aspect, pad bottom/right with 114; returns the (1,3,size,size) BGR float
    tensor and the scale factor (model pixels per original pixel)."""
    rgb = image.convert("RGB")
    scale = min(size / rgb.width, size / rgb.height)
    new_w, new_h = max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale))
    resized = np.asarray(rgb.resize((new_w, new_h), Image.BILINEAR), dtype=np.float32)
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.float32)
    canvas[:new_h, :new_w] = resized[:, :, ::-1]  # RGB -> BGR, as the model was trained
    return canvas.transpose(2, 0, 1)[None], scale


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
    centers = (raw[:, 0:2] + _GRID_CELLS) * _GRID_STRIDES
    sizes = np.exp(raw[:, 2:4]) * _GRID_STRIDES
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
    scores = raw[:, 4:5] * raw[:, 5:]
    return boxes, scores


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
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        order = rest[iou(boxes[best], boxes[rest]) <= iou_threshold]
    return keep


def postprocess(raw: np.ndarray, scale: float, width: int, height: int,
                min_score: float) -> list[Box]:
    """Decode, keep (anchor, class) pairs above ``min_score``, per-class NMS, back to image pixels."""
    boxes, scores = decode(raw)
    anchors, classes = np.nonzero(scores >= min_score)
    found: list[Box] = []
    for cls in np.unique(classes):
        idx = anchors[classes == cls]
        cls_boxes, cls_scores = boxes[idx], scores[idx, cls]
        for k in nms(cls_boxes, cls_scores):
            x1, y1, x2, y2 = (cls_boxes[k] / scale).tolist()
            found.append(Box(COCO_CLASSES[int(cls)], float(cls_scores[k]),
                             max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)))
    found.sort(key=lambda b: -b.score)
    return found


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Detector:
    """An onnxruntime session over a YOLOX-Nano file; ``version`` names the exact weights."""

    def __init__(self, model_path: str | Path, min_score: float = 0.05, threads: int = 0):
        import onnxruntime as ort

        path = Path(model_path).expanduser()
        if not path.is_file():
            raise DetectorError(
                f"detector model not found at {path}; run `python -m dataset models fetch` "
                "or set SHOPLENS_DETECTOR_MODEL_PATH")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
            raise DetectorError(f"cannot load detector model {path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.min_score = min_score
        # The version follows the weights, so replacing the file re-inspects every image.
        self.version = f"yolox_nano-{file_sha256(path)[:12]}"

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: tensor})[0][0]

    def detect(self, image: Image.Image) -> list[Box]:
        tensor, scale = letterbox(image)
        return postprocess(self.infer(tensor), scale, image.width, image.height, self.min_score)


def open_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (so truncated files fail here, with a clear error)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
