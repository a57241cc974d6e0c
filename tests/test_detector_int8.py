"""The int8 copy of the detector identify may run (shoplens.vision.detector_int8)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import shared_path
from shoplens.vision.detector import INPUT_SIZE, Detector, DetectorError
from shoplens.vision.detector_int8 import calibration_tensors, quantize_detector


def _photos(tmp_path, n: int) -> list:
    paths = []
    rng = np.random.default_rng(0)
    for i in range(n):
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (300 + 40 * i, 500, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_calibration_feeds_the_detectors_own_input_skipping_unreadable_photos(tmp_path):
    photos = _photos(tmp_path, 3)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a photo")
    tensors = list(calibration_tensors([broken, *photos], limit=2))
    assert len(tensors) == 2
    for tensor in tensors:
        assert tensor.shape == (1, 3, INPUT_SIZE, INPUT_SIZE) and tensor.dtype == np.float32
        # letterboxed: a 500 px wide photo fills the width, the padding below is 114
        assert tensor[0, :, -1, :].min() == 114 and tensor[0, :, -1, :].max() == 114


def test_quantising_a_missing_model_is_a_detector_error(tmp_path):
    with pytest.raises(DetectorError, match="not found|onnx package"):
        quantize_detector(tmp_path / "missing.onnx", tmp_path / "out.onnx", _photos(tmp_path, 1))


def _tiny_detector_model(path):
    """416 px input -> a stem conv, a depthwise conv, a pointwise conv, a 'preds' conv."""
    onnx = pytest.importorskip("onnx", reason="needs the onnx package (int8 quantisation)")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["images", "w0"], ["a"], name="stem", pads=[1] * 4, strides=[4, 4]),
             helper.make_node("Relu", ["a"], ["a1"]),
             helper.make_node("Conv", ["a1", "w1"], ["b"], name="dw", group=8, pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["b1"]),
             helper.make_node("Conv", ["b1", "w2"], ["c"], name="pw"),
             helper.make_node("Relu", ["c"], ["c1"]),
             helper.make_node("Conv", ["c1", "w3"], ["out"], name="head.preds")]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, INPUT_SIZE, INPUT_SIZE])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [weight("w0", (8, 3, 3, 3)), weight("w1", (8, 1, 3, 3)), weight("w2", (16, 8, 1, 1)),
         weight("w3", (4, 16, 1, 1))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), str(path))
    return onnx


def test_the_int8_copy_quantises_the_inner_convolutions_and_computes_nearly_the_same(tmp_path):
    import onnxruntime as ort

    source = tmp_path / "tiny.onnx"
    onnx = _tiny_detector_model(source)
    photos = _photos(tmp_path, 4)
    out = quantize_detector(source, tmp_path / "int8" / "tiny_int8.onnx", photos)
    model = onnx.load(str(out))
    quantized_weights = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert any(n.startswith("w1") for n in quantized_weights)
    assert any(n.startswith("w2") for n in quantized_weights)
    assert not any(n.startswith(("w0", "w3")) for n in quantized_weights)  # first and preds stay float
    assert source.read_bytes() != out.read_bytes() and not list(out.parent.glob("*.tmp*"))
    x = next(calibration_tensors(photos))
    exact = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    approx = Detector(out).infer(x)  # loads as identify's detector
    assert np.corrcoef(exact[0].ravel(), approx.ravel())[0, 1] > 0.98


def test_the_int8_copy_of_the_shared_detector_still_finds_chairs_in_an_ikea_room(tmp_path):
    """Needs ../shared (YOLOX-Nano and the IKEA rooms) and the onnx package."""
    pytest.importorskip("onnx", reason="needs the onnx package (int8 quantisation)")
    model = shared_path("models", "yolox_nano.onnx")
    rooms = sorted(shared_path("datasets", "ikea", "images", "room_scenes").glob("*.jpg"))
    out = quantize_detector(model, tmp_path / "yolox_int8.onnx", rooms[:8])
    room = shared_path("datasets", "ikea", "images", "room_scenes",
                       "ikea-dine-wherever-you-want__1364308412079-s4.jpg")
    image = Image.open(room).convert("RGB")
    float_chairs = [b for b in Detector(model, min_score=0.25).detect(image) if b.label == "chair"]
    int8_chairs = [b for b in Detector(out, min_score=0.25).detect(image) if b.label == "chair"]
    assert float_chairs and int8_chairs
