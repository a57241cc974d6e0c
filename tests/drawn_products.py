"""Toy products drawn as coloured shapes on varied backgrounds: photos a search index can tell apart,
for the search tests (tests/test_search.py, tests/test_search_service.py)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SHAPES = {1: ("red", "ellipse"), 2: ("blue", "rectangle"), 3: ("green", "triangle"),
          4: ("orange", "ellipse")}


def drawn_photo(product: int, variant: int) -> Image.Image:
    """A 64 px photo of ``product``: its shape and colour, placed and lit per ``variant``."""
    colour, shape = SHAPES[product]
    rng = np.random.default_rng(product * 100 + variant)
    img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(180, 255, 3)))
    draw = ImageDraw.Draw(img)
    x0, y0 = (int(v) for v in rng.integers(4, 16, 2))
    box = (x0, y0, x0 + 40, y0 + 40)
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
                     fill=colour)
    return img
