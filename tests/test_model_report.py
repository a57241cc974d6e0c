"""The evaluation report (modeling/evaluate.py) is rendered after a whole training run, from
product names the shop wrote: any name renders as the plain text it is, Korean in a font that has
Hangul, and a plot that still cannot be drawn is reported in the page instead of failing the run."""
from __future__ import annotations

import io
import json
import logging
import warnings

import numpy as np
from PIL import Image

from modeling import evaluate

MATH_LOOKING_NAME = "가격 $\\frac{a$ 할인"


def _jpeg(colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, "JPEG")
    return out.getvalue()


def _write(tmp_path, names, photos=None):
    """A three-photo test split whose every prediction is wrong (so both plots are drawn)."""
    entries = [{"label": i, "product_id": 100 + i, "name": name} for i, name in enumerate(names)]
    labels = np.array([0, 1, 2])
    probs = np.array([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.8, 0.1, 0.1]])
    photos = photos or [_jpeg((200, 0, 0)), _jpeg((0, 200, 0)), _jpeg((0, 0, 200))]
    metrics = {"test": {"ensemble": {"top1": 0.0, "top3": 1.0, "n": 3}}}
    out = tmp_path / "report"
    result = evaluate.write_report(out, "Model m on v0001", metrics, probs, labels, entries,
                                   photos, ["a" * 64, "b" * 64, "c" * 64])
    return out, result


def test_a_product_name_with_dollar_signs_is_drawn_as_plain_text_not_mathtext(tmp_path):
    """`$\\frac{a$` in a name is text: both plots render (no mathtext parse error) and the page
    shows the name as written."""
    out, result = _write(tmp_path, [MATH_LOOKING_NAME, "$x$ 매트리스", "컵 100$"])
    assert result["plot_errors"] == {}
    assert (out / "confusion.png").stat().st_size > 0 and (out / "mistakes.png").stat().st_size > 0
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "가격 $\\frac{a$ 할인" in page
    assert json.loads((out / "per_product.json").read_text(encoding="utf-8"))[0]["name"] == MATH_LOOKING_NAME


def test_korean_product_names_are_drawn_with_a_font_that_has_hangul(tmp_path):
    """matplotlib warns "Glyph ... missing from font(s)" for every character it draws as a box;
    with the CJK font found (fonts-noto-cjk, installed by `make deps`) no such warning is given."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result = _write(tmp_path, ["원목 침대 프레임", "메모리폼 매트리스", "스테인리스 냄비"])
    missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert missing == [], missing[:3]
    assert result["plot_errors"] == {}
    assert evaluate._name_fonts()[0] != "DejaVu Sans"


def test_a_plot_that_cannot_be_drawn_is_reported_and_does_not_fail_the_report(tmp_path, caplog):
    """A photo that no longer decodes breaks the mistakes grid: the error is logged and shown in
    the page, and the rest of the report (confusion plot, tables, per_product.json) is written,
    so the training run's result is still recorded."""
    photos = [b"not a photo", b"not a photo", b"not a photo"]
    with caplog.at_level(logging.ERROR, logger="modeling.evaluate"):
        out, result = _write(tmp_path, ["침대", "매트리스", "그릇"], photos)
    assert set(result["plot_errors"]) == {"mistakes.png"}
    assert "report plot _plot_mistakes failed" in caplog.text
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "plot not rendered" in page and '<img src="confusion.png"' in page
    assert not (out / "mistakes.png").exists()
    assert len(json.loads((out / "per_product.json").read_text(encoding="utf-8"))) == 3
    assert result["worst_mistakes"] == ["a" * 64, "b" * 64, "c" * 64]
