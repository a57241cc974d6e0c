"""An int8 copy of the detector model (issue 17's cost), for identify only.

    python -m shoplens.vision.detector_int8 OUT.onnx PHOTO_OR_FOLDER... [--model SRC] [--photos N]

onnxruntime's static quantisation (QDQ, int8 weights, uint8 activations) of the configured
detector file (``detector_model_path``, or ``--model``), its activation ranges calibrated on
photos fed exactly as :class:`~shoplens.vision.detector.Detector` feeds them (the one decoder,
letterboxed to 416 px). The copy is made here, never committed; point
``SHOPLENS_IDENTIFY_DETECTOR_MODEL_PATH`` at it. The filter keeps ``detector_model_path``, so
its stored detections and decisions do not change. It needs the ``onnx`` package (onnxruntime's
quantisation tools import it); docs/benchmarks.md says what the copy costs and saves.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from shoplens.photos import PhotoRejected, decode_photo, read_photo_file
from shoplens.vision.detector import INPUT_SIZE, DetectorError, fit_for_model, tensor_from_fitted

CALIBRATION_PHOTOS = 32


def calibration_tensors(paths: Iterable[str | Path], limit: int = CALIBRATION_PHOTOS
                        ) -> Iterator[np.ndarray]:
    """The detector's input tensors of up to ``limit`` readable photos (unreadable ones skipped)."""
    given = 0
    for path in paths:
        if given >= limit:
            return
        try:
            photo = decode_photo(read_photo_file(path), reduce_to=INPUT_SIZE)
        except (PhotoRejected, OSError):
            continue
        fitted, _ = fit_for_model(photo.image, (photo.width, photo.height))
        given += 1
        yield tensor_from_fitted(fitted)


def quantize_detector(source: str | Path, out: str | Path, photos: Iterable[str | Path],
                      limit: int = CALIBRATION_PHOTOS) -> Path:
    """Write the int8 copy of the ONNX model ``source`` to ``out``, calibrated on ``photos``;
    :class:`DetectorError` when it cannot (no onnx package, no model, no readable photo)."""
    try:
        import onnx
        from onnx import version_converter
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                              QuantFormat, QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise DetectorError(f"int8 quantisation needs the onnx package ({exc})") from None
    import onnxruntime as ort

    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.is_file():
        raise DetectorError(f"detector model not found at {source}")
    input_name = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]
                                      ).get_inputs()[0].name
    tensors = list(calibration_tensors(photos, limit))
    if not tensors:
        raise DetectorError("no readable calibration photo given")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(tensors)

        def get_next(self):
            tensor = next(self.left, None)
            return None if tensor is None else {input_name: tensor}

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        prepared = Path(work) / "prepared.onnx"  # shapes inferred: what quantize_static expects
        quant_pre_process(str(source), str(prepared))
        # Opset 13 for per-channel weights (the depthwise convolutions' channels differ by
        # orders of magnitude: one scale per tensor loses most of them).
        model = onnx.load(str(prepared))
        if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
            onnx.save(version_converter.convert_version(model, 13), str(prepared))
        convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
        written = Path(work) / "int8.onnx"
        # Convolutions only (the head concatenates box offsets with 0..1 scores into one output:
        # one scale over both zeroes every score), not the first (raw pixels) nor the last ones
        # (the predictions); activation ranges at percentiles, not the extremes.
        quantize_static(str(prepared), str(written), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, op_types_to_quantize=["Conv"],
                        nodes_to_exclude=[convs[0], *(c for c in convs if "preds" in c)],
                        calibrate_method=CalibrationMethod.Percentile,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(written, out)  # whole or not at all
    return out


def main(argv=None) -> int:
    from shoplens.config import Settings
    from shoplens.vision.images import expand_paths

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="where the int8 model is written")
    ap.add_argument("photos", nargs="+", help="calibration photos (files or folders)")
    ap.add_argument("--model", help="the float model (default: detector_model_path)")
    ap.add_argument("--photos", dest="limit", type=int, default=CALIBRATION_PHOTOS,
                    help="at most this many calibration photos")
    args = ap.parse_args(argv)
    source = args.model or Settings.from_env().detector_model_path
    try:
        out = quantize_detector(source, args.out, expand_paths(args.photos), args.limit)
    except DetectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}; use it with SHOPLENS_IDENTIFY_DETECTOR_MODEL_PATH={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
