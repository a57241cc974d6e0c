"""The detector's own pre- and post-processing around the YOLOX-Nano ONNX graph."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from shoplens.vision.detector import (COCO_CLASSES, PAD_VALUE, Detector, DetectorError, letterbox, nms,
                              postprocess, postprocess_dicts)
from tests.conftest import shared_path

BANANA, CHAIR, PERSON = (COCO_CLASSES.index(c) for c in ("banana", "chair", "person"))
STRIDE32_START = 52 * 52 + 26 * 26


def raw_output() -> np.ndarray:
    return np.zeros((3549, 85), dtype=np.float32)


def set_anchor(raw, index, dx, dy, log_w, log_h, objectness, cls, cls_score):
    raw[index, :5] = [dx, dy, log_w, log_h, objectness]
    raw[index, 5 + cls] = cls_score


def test_letterbox_keeps_aspect_pads_bottom_right_with_114_and_swaps_to_bgr():
    image = Image.new("RGB", (832, 416), (200, 100, 50))
    tensor, scale = letterbox(image)
    assert tensor.shape == (1, 3, 416, 416) and tensor.dtype == np.float32
    assert scale == 0.5
    assert tensor[0, :, 0, 0].tolist() == [50, 100, 200]  # B, G, R
    assert tensor[0, :, 207, 415].tolist() == [50, 100, 200]
    assert (tensor[0, :, 208:, :] == PAD_VALUE).all()


def test_decode_and_nms_match_hand_computed_boxes():
    raw = raw_output()
    # Stride 8, cell (x=10, y=5) is anchor 5*52+10: centre ((10+0.5)*8, (5+0.25)*8) = (84, 42),
    # size (e^ln4 * 8, e^ln2 * 8) = (32, 16) -> box (68, 34, 100, 50), score 0.9*0.8 = 0.72.
    set_anchor(raw, 270, 0.5, 0.25, math.log(4), math.log(2), 0.9, BANANA, 0.8)
    # The neighbouring cell predicts the same box with a lower score: NMS removes it.
    set_anchor(raw, 271, -0.5, 0.25, math.log(4), math.log(2), 0.9, BANANA, 0.5)
    # Same place, another class: NMS is per class, so it stays.
    set_anchor(raw, 272, -1.5, 0.25, math.log(4), math.log(2), 0.6, CHAIR, 0.9)
    # Stride 32, cell (x=2, y=3): centre (64, 96), size 32x32 -> (48, 80, 80, 112), score 0.45.
    set_anchor(raw, STRIDE32_START + 3 * 13 + 2, 0, 0, 0, 0, 0.5, PERSON, 0.9)
    # Below the score threshold: dropped.
    set_anchor(raw, 1000, 0, 0, 0, 0, 0.1, CHAIR, 0.5)

    boxes = postprocess(raw, scale=0.5, width=1000, height=1000, min_score=0.3)

    got = [(b.label, round(b.score, 4), [round(v, 3) for v in (b.x1, b.y1, b.x2, b.y2)])
           for b in boxes]
    assert got == [
        ("banana", 0.72, [136.0, 68.0, 200.0, 100.0]),
        ("chair", 0.54, [136.0, 68.0, 200.0, 100.0]),
        ("person", 0.45, [96.0, 160.0, 160.0, 224.0]),
    ]


def test_nms_never_lets_one_class_suppress_another_wherever_its_box_lies():
    raw = raw_output()
    apple = COCO_CLASSES.index("apple")  # the class right after banana
    # A junk banana box one class-offset (4 x 416 px) right of and below an apple box of the
    # same size: shifting boxes apart by class index would make the two coincide.
    set_anchor(raw, 270, 0.5 + 4 * 416 / 8, 0.25 + 4 * 416 / 8, math.log(4), math.log(2), 0.9,
               BANANA, 0.8)
    set_anchor(raw, 271, -0.5, 0.25, math.log(4), math.log(2), 0.9, apple, 0.7)
    labels = [b.label for b in postprocess(raw, 1.0, 4000, 416, min_score=0.3)]
    assert labels == ["banana", "apple"]


def test_boxes_are_clipped_to_the_image():
    raw = raw_output()
    set_anchor(raw, 0, 0, 0, math.log(4), math.log(4), 0.9, CHAIR, 0.9)  # centre (0, 0), 32x32
    [box] = postprocess(raw, scale=1.0, width=20, height=10, min_score=0.3)
    assert (box.x1, box.y1, box.x2, box.y2) == (0.0, 0.0, 16.0, 10.0)


def test_nms_keeps_best_of_overlapping_and_all_disjoint_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    assert nms(boxes, np.array([0.5, 0.9, 0.4])) == [1, 2]


def test_nms_a_suppressed_box_suppresses_nothing():
    # b overlaps a and c; a and c barely overlap: greedy NMS keeps a, drops b, so c stays.
    a, b, c = [0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]
    assert nms(np.array([a, b, c], dtype=np.float32), np.array([0.9, 0.8, 0.7])) == [0, 2]


def test_stored_form_matches_the_box_objects():
    raw = raw_output()
    set_anchor(raw, 270, 0.5, 0.25, math.log(4), math.log(2), 0.9, BANANA, 0.8)
    set_anchor(raw, 272, -1.5, 0.25, math.log(4), math.log(2), 0.6, CHAIR, 0.9)
    as_objects = [b.as_dict() for b in postprocess(raw, 0.37, 1000, 700, min_score=0.3)]
    assert postprocess_dicts(raw, 0.37, 1000, 700, min_score=0.3) == as_objects
    assert postprocess_dicts(raw_output(), 1.0, 10, 10, min_score=0.3) == []


def test_missing_model_file_says_how_to_get_it(tmp_path):
    with pytest.raises(DetectorError, match="python -m dataset models fetch"):
        Detector(tmp_path / "absent.onnx")


@pytest.fixture(scope="module")
def detector():
    return Detector(shared_path("models", "yolox_nano.onnx"))


def test_banana_photo_is_detected_as_banana(detector):
    photo = shared_path("datasets", "grocery", "train", "Fruit", "Banana", "Banana_001.jpg")
    boxes = detector.detect(Image.open(photo))
    assert boxes[0].label == "banana" and boxes[0].score > 0.5


def test_room_scene_gives_several_furniture_boxes(detector):
    room = shared_path("datasets", "ikea", "images", "room_scenes",
                       "ikea-a-bed-that-folds-away-to-be-a-sofa-by-day__1364309472525-s4.jpg")
    image = Image.open(room)
    confident = [b for b in detector.detect(image) if b.score >= 0.3]
    furniture = {b.label for b in confident} & {"bed", "chair", "couch", "dining table", "potted plant"}
    assert len(furniture) >= 2, confident
    assert all(0 <= b.x1 < b.x2 <= image.width and 0 <= b.y1 < b.y2 <= image.height for b in confident)
