"""Where the replica's photos come from: a photo folder, a listing CSV, or the grocery data set.

Every source yields :class:`ProductSource` rows (category, product, photo files). The grocery
listing groups the 81 fine classes of the GroceryStoreDataset into 6 shop categories.
"""
from __future__ import annotations

import csv
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from shoplens.config import DEFAULT_CATEGORIES

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
EIGHT_DIGITS = re.compile(r"^\d{8}$")


class ListingError(ValueError):
    """A photo folder or listing the replica cannot use; the message says what and where."""


@dataclass
class ProductSource:
    category: str  # display name of the category
    category_id: str  # 8-digit shop category id
    name: str | None  # product name; None = let the catalogue invent a Korean one
    photos: list[Path] = field(default_factory=list)
    key: str = ""  # stable identity used to seed per-product values (defaults to the name)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = f"{self.category_id}/{self.name}"


def category_id_for(name: str) -> str:
    """A shop category name from DEFAULT_CATEGORIES or an 8-digit id maps as is; others by hash."""
    for cat_id, cat_name in DEFAULT_CATEGORIES.items():
        if name == cat_name:
            return cat_id
    if EIGHT_DIGITS.match(name):
        return name
    digest = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:12], 16)
    return str(10_000_000 + digest % 90_000_000)


def category_title(name: str) -> str:
    """The title shown by the shop: an 8-digit id known to DEFAULT_CATEGORIES gets its name."""
    return DEFAULT_CATEGORIES.get(name, name)


def scan_photo_dir(root: Path) -> list[ProductSource]:
    """Photos laid out ``root/<category>/<product>/*.jpg|png|webp``."""
    root = Path(root)
    if not root.is_dir():
        raise ListingError(f"--photos {root}: not a directory")
    sources = []
    for cat_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for prod_dir in sorted(p for p in cat_dir.iterdir() if p.is_dir()):
            photos = sorted(p for p in prod_dir.iterdir()
                            if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
            sources.append(ProductSource(category_title(cat_dir.name), category_id_for(cat_dir.name),
                                         prod_dir.name, photos))
    if not any(s.photos for s in sources):
        raise ListingError(f"--photos {root}: no photos found in <category>/<product>/ folders")
    return sources


def read_listing(csv_path: Path) -> list[ProductSource]:
    """Rows ``category,product,photo[,category_id]``; photo paths absolute or relative to the CSV."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ListingError(f"--listing {csv_path}: no such file")
    grouped: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
    with csv_path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"category", "product", "photo"} - set(reader.fieldnames or [])
        if missing:
            raise ListingError(f"{csv_path}: header lacks column(s) {sorted(missing)}; "
                               "expected category,product,photo[,category_id]")
        for line_no, row in enumerate(reader, start=2):
            category, product, photo = (row["category"] or "").strip(), \
                (row["product"] or "").strip(), (row["photo"] or "").strip()
            if not (category and product and photo):
                raise ListingError(f"{csv_path}:{line_no}: empty category, product or photo")
            cat_id = (row.get("category_id") or "").strip() or category_id_for(category)
            if not EIGHT_DIGITS.match(cat_id):
                raise ListingError(f"{csv_path}:{line_no}: category_id {cat_id!r} is not 8 digits")
            path = Path(photo) if Path(photo).is_absolute() else csv_path.parent / photo
            if not path.is_file():
                raise ListingError(f"{csv_path}:{line_no}: photo {path} does not exist")
            grouped[(cat_id, category_title(category), product)].append(path)
    if not grouped:
        raise ListingError(f"{csv_path}: no rows")
    return [ProductSource(title, cat_id, product, sorted(paths))
            for (cat_id, title, product), paths in sorted(grouped.items())]


# --- the grocery data set as a 6-category shop ---------------------------------------------------
# Coarse classes of GroceryStoreDataset -> shop category; families kept together, 10-16 products
# per category so that every category stays under the crawler's best-20.
GROCERY_GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("사과/배/핵과", ("Apple", "Pear", "Nectarine", "Peach", "Plum", "Pomegranate", "Avocado",
                   "Mango")),
    ("감귤/열대과일", ("Lemon", "Lime", "Orange", "Red-Grapefruit", "Satsumas", "Banana", "Kiwi",
                   "Melon", "Papaya", "Passion-Fruit", "Pineapple")),
    ("주스/우유", ("Juice", "Milk")),
    ("요거트/식물성음료", ("Yoghurt", "Soyghurt", "Oatghurt", "Sour-Cream", "Sour-Milk", "Soy-Milk",
                      "Oat-Milk")),
    ("피망/토마토/열매채소", ("Pepper", "Tomato", "Aubergine", "Cucumber", "Zucchini")),
    ("뿌리/줄기채소", ("Carrots", "Garlic", "Ginger", "Onion", "Potato", "Red-Beet", "Asparagus",
                   "Cabbage", "Leek", "Mushroom")),
]


def grocery_listing(root: Path, split: str = "train") -> list[tuple[str, str, str, Path]]:
    """``(category, category_id, product, photo)`` rows for every photo of a grocery split.

    Category ids are the ids of ``DEFAULT_CATEGORIES`` in order, so a crawl with default settings
    covers the whole set; the product name is the fine class name (e.g. ``Granny-Smith``).
    """
    root = Path(root)
    classes_csv, split_txt = root / "classes.csv", root / f"{split}.txt"
    for needed in (classes_csv, split_txt):
        if not needed.is_file():
            raise ListingError(f"grocery data set at {root}: missing {needed.name}")
    fine_names: dict[int, str] = {}
    coarse_of: dict[str, str] = {}
    with classes_csv.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            fine_names[int(row[1])] = row[0]
            coarse_of[row[0]] = row[2]
    group_of_coarse = {coarse: index for index, (_, coarses) in enumerate(GROCERY_GROUPS)
                       for coarse in coarses}
    unmapped = sorted({c for c in coarse_of.values() if c not in group_of_coarse})
    if unmapped:
        raise ListingError(f"grocery coarse classes without a shop category: {unmapped}")
    category_ids = list(DEFAULT_CATEGORIES)
    rows = []
    for line_no, line in enumerate(split_txt.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        rel_path, fine_id, _coarse_id = (part.strip() for part in line.split(","))
        fine = fine_names[int(fine_id)]
        photo = root / rel_path
        if not photo.is_file():
            raise ListingError(f"{split_txt}:{line_no}: photo {photo} does not exist")
        group = group_of_coarse[coarse_of[fine]]
        rows.append((GROCERY_GROUPS[group][0], category_ids[group], fine, photo))
    return sorted(rows, key=lambda r: (r[1], r[2], str(r[3])))


def write_listing(rows: list[tuple[str, str, str, Path]], out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["category", "category_id", "product", "photo"])
        for category, category_id, product, photo in rows:
            writer.writerow([category, category_id, product, str(Path(photo).resolve())])
    tmp.replace(out)
