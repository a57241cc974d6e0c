"""The filter's rules: pure functions of stored features (detections + image statistics) and
thresholds. Changing a threshold re-decides from the manifest without running the detector.

Each rule returns a :class:`Decision` with a score (the measured quantity the threshold is applied
to) so a data engineer can see how close an image came. ``RULES_VERSION`` changes whenever the
meaning of a rule changes (not when a threshold does: thresholds are stored with every decision).

How products are counted (multi-product rule):
1. Only boxes of classes that count as a product for the image's category, with score >=
   ``min_score`` and covering >= ``min_box_area`` of the frame. People never count.
2. Boxes of the same kind are one product: a bunch of bananas, a stack of bowls or a set of
   chairs is what one review photo of one product shows. A kind is the detector class, except
   that all food classes are one kind (on a pile of produce the detector names neighbouring
   items apple, orange or donut at random). Two different chairs are therefore one product: a
   known limit of a class-level detector.
3. Boxes of different classes that overlap with IoU >= ``same_object_iou`` are one object the
   detector could not name for sure (an armchair seen as both chair and couch).
Two or more products left -> rejected.

A furnished room is a scene of several products even when the detector names only one of them
confidently (rules-3). On a cluttered background (border ring plain < ``plain_border``; a studio
or table-top photo's border is plain and none of this applies there):
4. Boxes of furniture classes (``SCENE_CLASSES``) count from ``scene_min_score`` (lower than
   ``min_score``): the detector is unsure of the second piece of furniture in a room far more
   often than of a second grocery item (which is why only furniture). Grouped as in 2-3.
5. ``scene_repeats`` or more separate boxes (pairwise IoU < ``SEPARATE_IOU``) of one furniture
   class, each >= ``min_score``, are that many products: five chairs spread over a cluttered
   photo are a dining room, not one product (on a plain background a set of chairs stays one).
6. Room-ness: when the main product (see occupancy) covers < ``scene_max_share`` of a cluttered
   photo, the photo is about a scene, not that product, and is rejected as multi-product whatever
   the count. ``scene_max_share`` < ``min_occupancy``, so this alone changes no verdict (the
   occupancy rule rejects those photos too); it names them for what they are (and a rejected
   multi-product photo is what salvage crops from).
Set ``scene_min_score`` to ``min_score``, ``scene_repeats`` to 0 and ``scene_max_share`` to 0 to get
rules-2's count back.

Before step 2, a *holder* is set aside: a box of a class that holds products (dining table,
bench, bowl, sink, refrigerator, oven, microwave) that encloses >= ``holder_inside`` of every other
product box, without being the same object as one of them (step 3), is where the product lies
(fruit in a bowl, a carton on a fridge shelf), not a second product; it counts neither as a
product nor for occupancy.

Occupancy: on a plain background (border ring plain >= ``plain_border``) the foreground extent is
the estimate (the detector misses many studio products and its boxes are loose). Otherwise it is
the share of the *main product*: the product group holding the most confident box (a big piece of
furniture the detector is unsure of, behind a small product, is not what the photo is about). Its
share is its largest box, except for food, where it is the extent of all its boxes (a pile of
produce is one product; the detector boxes single fruits). When the background is not plain and
no product is detected, ``occupancy_when_unknown`` decides (chosen by measurement: see
docs/benchmarks.md); the stored decision's score is then NULL and the CLI reports occupancy 0.0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

from shoplens.vision.detector import COCO_CLASSES

RULES_VERSION = "rules-3"

FURNITURE = ("chair", "couch", "bed", "dining table", "bench", "potted plant", "toilet", "sink")
KITCHENWARE = ("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "vase",
               "scissors", "microwave", "oven", "toaster", "refrigerator")
FOOD = ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
        "donut", "cake")
DECOR_AND_DEVICES = ("clock", "book", "teddy bear", "tv", "laptop", "mouse", "remote",
                     "keyboard", "cell phone", "hair drier", "toothbrush", "umbrella", "handbag",
                     "backpack", "suitcase")
DEFAULT_PRODUCT_CLASSES = FURNITURE + KITCHENWARE + FOOD + DECOR_AND_DEVICES
NEVER_PRODUCTS = frozenset({"person"})
# Furniture: what a room scene is made of (steps 4-5 of the count, on a cluttered background only).
SCENE_CLASSES = FURNITURE
# Boxes of one class overlapping less than this are separate pieces (step 5).
SEPARATE_IOU = 0.1
# Classes that hold or carry other products: see "holder" in the module doc.
HOLDERS = frozenset({"dining table", "bench", "bowl", "sink", "refrigerator", "oven", "microwave"})

RULE_NAMES = ("unreadable", "too_small", "aspect_ratio", "blank", "multi_product", "occupancy")


@dataclass(frozen=True)
class RuleParams:
    min_score: float = 0.25
    min_box_area: float = 0.005
    same_object_iou: float = 0.5
    holder_inside: float = 0.8
    min_occupancy: float = 0.5
    plain_border: float = 0.9
    occupancy_when_unknown: str = "pass"  # "pass" | "reject"
    min_side: int = 224
    max_aspect: float = 3.0
    min_luma_std: float = 6.0
    scene_min_score: float = 0.15
    scene_repeats: int = 3
    scene_max_share: float = 0.2
    # category id -> detector classes that count as a product there; "*" is the default.
    product_classes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def classes_for(self, category_id: str | None) -> frozenset[str]:
        chosen = self.product_classes.get(category_id or "", self.product_classes.get("*"))
        return frozenset(chosen or DEFAULT_PRODUCT_CLASSES) - NEVER_PRODUCTS

    def as_json(self) -> dict:
        d = asdict(self)
        d["product_classes"] = {k: list(v) for k, v in self.product_classes.items()}
        return d


@dataclass(frozen=True)
class Decision:
    rule: str
    passed: bool
    score: float | None
    reason: str | None = None  # set when rejected: the reason shown to people


@dataclass(frozen=True)
class Features:
    """What is stored per image and detector version: everything a rule may look at."""

    width: int
    height: int
    boxes: list[dict]  # {"label", "score", "box": [x1, y1, x2, y2]} in image pixels
    stats: dict  # dataset.filter.occupancy.image_statistics
    category_id: str | None = None


def _area(b: list[float]) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _iou(a: list[float], b: list[float]) -> float:
    inter = _area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _inside(inner: list[float], outer: list[float]) -> float:
    """Share of ``inner``'s area that lies within ``outer``."""
    area = _area(inner)
    overlap = _area([max(inner[0], outer[0]), max(inner[1], outer[1]),
                     min(inner[2], outer[2]), min(inner[3], outer[3])])
    return overlap / area if area > 0 else 0.0


def _extent(boxes: list[dict]) -> list[float]:
    return [min(b["box"][0] for b in boxes), min(b["box"][1] for b in boxes),
            max(b["box"][2] for b in boxes), max(b["box"][3] for b in boxes)]


def product_boxes(f: Features, p: RuleParams) -> list[dict]:
    """Boxes that count as products: product classes, confident and big enough, holders set aside."""
    classes = p.classes_for(f.category_id)
    frame = float(f.width * f.height)
    boxes = [b for b in f.boxes
             if b["label"] in classes and b["score"] >= p.min_score
             and _area(b["box"]) / frame >= p.min_box_area]
    held = [b for b in boxes if b["label"] not in HOLDERS]
    if not held:
        return boxes
    return [b for b in boxes if b["label"] not in HOLDERS or not _holds_all(b, held, p)]


def _holds_all(holder: dict, held: list[dict], p: RuleParams) -> bool:
    """``holder`` encloses every held box, and is none of them under another name (a box that
    is the same object, IoU >= same_object_iou, is that object: a bench also seen as a chair)."""
    return all(_inside(h["box"], holder["box"]) >= p.holder_inside
               and _iou(h["box"], holder["box"]) < p.same_object_iou for h in held)


def kind_of(label: str) -> str:
    """Food classes are one kind: on a pile of produce the detector names neighbouring items
    apple, orange or donut at random, and no home-goods photo is about two foods."""
    return "food" if label in FOOD else label


def group_products(boxes: list[dict], same_object_iou: float) -> list[list[dict]]:
    """Boxes grouped into products (same kind, or different kinds on the same object)."""
    groups: list[list[dict]] = []
    for box in sorted(boxes, key=lambda b: -b["score"]):
        home = None
        for group in groups:
            if any(kind_of(g["label"]) == kind_of(box["label"]) or _iou(g["box"], box["box"]) >= same_object_iou
                   for g in group):
                home = group
                break
        if home is None:
            groups.append([box])
        else:
            home.append(box)
    # Two groups joined later by one box (transitive overlap) are merged.
    merged = True
    while merged:
        merged = False
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                if any(kind_of(a["label"]) == kind_of(b["label"]) or _iou(a["box"], b["box"]) >= same_object_iou
                       for a in groups[i] for b in groups[j]):
                    groups[i].extend(groups.pop(j))
                    merged = True
                    break
            if merged:
                break
    return groups


def cluttered(f: Features, p: RuleParams) -> bool:
    """The border ring is not plain: a scene around the product, not a studio backdrop."""
    return f.stats.get("border_plain", 0.0) < p.plain_border


def scene_boxes(f: Features, p: RuleParams) -> list[dict]:
    """Furniture boxes below ``min_score`` but >= ``scene_min_score`` (step 4), on a cluttered
    background only; product classes and the size floor still apply."""
    if not cluttered(f, p) or p.scene_min_score >= p.min_score:
        return []
    classes = p.classes_for(f.category_id) & frozenset(SCENE_CLASSES)
    frame = float(f.width * f.height)
    return [b for b in f.boxes
            if b["label"] in classes and p.scene_min_score <= b["score"] < p.min_score
            and _area(b["box"]) / frame >= p.min_box_area]


def repeated_furniture(f: Features, p: RuleParams) -> int:
    """The most separate boxes (pairwise IoU < SEPARATE_IOU) of any one furniture class among the
    product boxes (step 5); 0 on a plain background."""
    if not cluttered(f, p):
        return 0
    best = 0
    boxes = product_boxes(f, p)
    for label in SCENE_CLASSES:
        separate: list[dict] = []
        for b in sorted((b for b in boxes if b["label"] == label), key=lambda b: -b["score"]):
            if all(_iou(b["box"], s["box"]) < SEPARATE_IOU for s in separate):
                separate.append(b)
        best = max(best, len(separate))
    return best


def count_products(f: Features, p: RuleParams) -> int:
    boxes = product_boxes(f, p)
    n = len(group_products(boxes, p.same_object_iou))
    extra = scene_boxes(f, p)
    if extra:
        # A weak box overlapping two products can join their groups: the larger count stands.
        n = max(n, len(group_products(boxes + extra, p.same_object_iou)))
    if p.scene_repeats:
        repeats = repeated_furniture(f, p)
        if repeats >= p.scene_repeats:
            n = max(n, repeats)
    return n


def estimate_occupancy(f: Features, p: RuleParams) -> float | None:
    """Share of the frame the main product covers, or None when it cannot be told."""
    if f.stats.get("border_plain", 0.0) >= p.plain_border:
        return float(f.stats.get("fg_extent", 0.0))
    boxes = product_boxes(f, p)
    if not boxes:
        return None
    # group_products starts from the most confident box, so the first group is the main product.
    main = group_products(boxes, p.same_object_iou)[0]
    frame = float(f.width * f.height)
    if kind_of(main[0]["label"]) == "food":
        return _area(_extent(main)) / frame
    return max(_area(b["box"]) for b in main) / frame


def unreadable(f: Features, p: RuleParams) -> Decision:
    error = f.stats.get("decode_error")
    return Decision("unreadable", error is None, None, None if error is None else f"unreadable: {error}")


def too_small(f: Features, p: RuleParams) -> Decision:
    side = min(f.width, f.height)
    ok = side >= p.min_side
    return Decision("too_small", ok, float(side), None if ok else f"too small ({f.width}x{f.height})")


def aspect_ratio(f: Features, p: RuleParams) -> Decision:
    ratio = max(f.width, f.height) / max(1, min(f.width, f.height))
    ok = ratio <= p.max_aspect
    return Decision("aspect_ratio", ok, round(ratio, 3), None if ok else f"extreme aspect ratio {ratio:.1f}")


def blank(f: Features, p: RuleParams) -> Decision:
    spread = float(f.stats.get("luma_std", 0.0))
    ok = spread >= p.min_luma_std
    return Decision("blank", ok, spread, None if ok else "nearly blank")


def multi_product(f: Features, p: RuleParams) -> Decision:
    """Score: the number of products counted. A room scene (step 6) is rejected with its count."""
    n = count_products(f, p)
    if n >= 2:
        return Decision("multi_product", False, float(n), f"{n} products in view")
    if p.scene_max_share > 0 and cluttered(f, p):
        share = estimate_occupancy(f, p)
        if share is not None and share < p.scene_max_share:
            return Decision("multi_product", False, float(n),
                            f"a room scene (its main product covers {share:.0%})")
    return Decision("multi_product", True, float(n), None)


def occupancy(f: Features, p: RuleParams) -> Decision:
    share = estimate_occupancy(f, p)
    if share is None:
        ok = p.occupancy_when_unknown == "pass"
        return Decision("occupancy", ok, None, None if ok else "no product found")
    ok = share >= p.min_occupancy
    return Decision("occupancy", ok, round(share, 4),
                    None if ok else f"product covers {share:.0%} of the photo")


RULES = {"unreadable": unreadable, "too_small": too_small, "aspect_ratio": aspect_ratio,
         "blank": blank, "multi_product": multi_product, "occupancy": occupancy}


def decide(f: Features, p: RuleParams) -> list[Decision]:
    """Every rule's decision; an unreadable image gets only that one (the others would be noise)."""
    first = unreadable(f, p)
    if not first.passed:
        return [first]
    return [first] + [RULES[name](f, p) for name in RULE_NAMES[1:]]


def verdict(decisions: list[Decision]) -> tuple[str, list[str]]:
    reasons = [d.rule for d in decisions if not d.passed]
    return ("reject" if reasons else "keep"), reasons


def params_from_settings(settings) -> RuleParams:
    """The rule thresholds configured in :class:`shoplens.config.Settings` (``filter_*``)."""
    if settings.filter_occupancy_when_unknown not in ("pass", "reject"):
        raise ValueError("filter_occupancy_when_unknown must be 'pass' or 'reject', "
                         f"got {settings.filter_occupancy_when_unknown!r}")
    mapping = {}
    for category, classes in dict(settings.filter_product_classes).items():
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"filter_product_classes[{category!r}] must be a list of class names")
        unknown = sorted(set(classes) - set(COCO_CLASSES))
        if unknown:
            raise ValueError(f"filter_product_classes[{category!r}] names unknown classes {unknown}")
        mapping[str(category)] = tuple(classes)
    return RuleParams(
        min_score=settings.filter_min_score, min_box_area=settings.filter_min_box_area,
        same_object_iou=settings.filter_same_object_iou, holder_inside=settings.filter_holder_inside,
        min_occupancy=settings.filter_min_occupancy, plain_border=settings.filter_plain_border,
        occupancy_when_unknown=settings.filter_occupancy_when_unknown,
        min_side=settings.filter_min_side, max_aspect=settings.filter_max_aspect,
        min_luma_std=settings.filter_min_luma_std, scene_min_score=settings.filter_scene_min_score,
        scene_repeats=settings.filter_scene_repeats, scene_max_share=settings.filter_scene_max_share,
        product_classes=mapping)
