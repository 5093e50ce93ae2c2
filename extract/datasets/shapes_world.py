"""The world of ``shapes``: what an item is (its attributes, its captions, its picture), from a seed alone.

The dataset (``shapes``) serves these items; the judge and the scorer (``shapes_judge``,
``shapes_scoring``) read attributes back off pictures and check translations against them. All three
build on this module, so that imports point one way: the dataset names its scorer, and the scorer needs
nothing of the dataset.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = ("small", "large")
POSITIONS = ("top-left", "top-center", "top-right",
             "center-left", "center", "center-right",
             "bottom-left", "bottom-center", "bottom-right")  # row-major: row = index // 3, col = index % 3
ATTRIBUTES = ("color", "shape", "size", "position")

# Far apart in RGB (nearest pair, yellow/orange, is ~85 apart) and all far from the background.
RGB = {
    "red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (240, 220, 50),
    "magenta": (210, 60, 210), "cyan": (50, 210, 220), "orange": (250, 140, 30), "white": (240, 240, 240),
}
BACKGROUND = (20, 20, 24)
# Shape extent (circumscribed diameter) as a share of the image side; a cell is 1/3 of it.
EXTENT = {"small": 0.22, "large": 0.33}
MIN_SIZE = 32  # below this a small star or cross is a few pixels and no longer recognisable
MAX_SIZE = 1024  # beyond this an item is megabytes of flat colour that no expert looks at in full

# Synonyms per value; no phrase of one value is a word of another value's phrases or of a template.
COLOR_WORDS = {
    "red": ("red", "crimson", "scarlet"), "green": ("green", "emerald"), "blue": ("blue", "cobalt"),
    "yellow": ("yellow", "golden"), "magenta": ("magenta", "purple", "fuchsia"),
    "cyan": ("cyan", "turquoise", "aqua"), "orange": ("orange", "tangerine"), "white": ("white", "ivory"),
}
SHAPE_WORDS = {
    "circle": ("circle", "disc", "ball"), "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"), "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign", "plus"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
POSITION_WORDS = {
    "top-left": ("in the top left", "at the upper left corner", "in the top left corner"),
    "top-center": ("at the top", "in the top middle", "along the upper edge"),
    "top-right": ("in the top right", "at the upper right corner", "in the top right corner"),
    "center-left": ("on the left", "at the left side", "in the middle left"),
    "center": ("in the center", "in the middle", "at the centre"),
    "center-right": ("on the right", "at the right side", "in the middle right"),
    "bottom-left": ("in the bottom left", "at the lower left corner", "in the bottom left corner"),
    "bottom-center": ("at the bottom", "in the bottom middle", "along the lower edge"),
    "bottom-right": ("in the bottom right", "at the lower right corner", "in the bottom right corner"),
}
GENERIC_NOUNS = ("shape", "object", "figure")  # stand in for the shape when a caption leaves it open
# {a}: article, {desc}: [size] [colour] noun, {pos}: " " + position phrase or "", {lead}: position phrase + ", " or "".
TEMPLATES = (
    "{a} {desc}{pos}",
    "there is {a} {desc}{pos}",
    "{desc}{pos}",
    "a picture of {a} {desc}{pos}",
    "{lead}there is {a} {desc}",
    "{a} {desc} on a dark background{pos}",
)
CAPTIONS_PER_ITEM = 5
OMIT_SHARE = 0.3
DEFAULT_COUNT = {"train": 20000, "val": 2000, "test": 2000}


# ---------------------------------------------------------------- rendering


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The polygon of a non-circle shape of circumradius r centred on (cx, cy)."""
    if shape == "square":
        h = 0.8 * r  # about a circle's area, so "large" means the same to every shape
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, pointing up, centroid on the centre
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":  # five points; a fat inner radius keeps the points visible on a small star
        return [(cx + rr * math.cos(-math.pi / 2 + k * math.pi / 5), cy + rr * math.sin(-math.pi / 2 + k * math.pi / 5))
                for k, rr in enumerate([r, 0.5 * r] * 5)]
    if shape == "cross":
        w = 0.3 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def render(attrs: dict, size: int) -> Image.Image:
    """The RGB picture of ``attrs`` ({"color", "shape", "size", "position"}) at size x size pixels:
    an item's image is exactly ``render(dataset.attributes(i), dataset.size)``."""
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    cell = size / 3
    cx, cy, r = (col + 0.5) * cell, (row + 0.5) * cell, EXTENT[attrs["size"]] * size / 2
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    fill = RGB[attrs["color"]]
    if attrs["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_outline(attrs["shape"], cx, cy, r), fill=fill)
    return img


# ---------------------------------------------------------------- captions


def caption(attrs: dict, named: dict[str, bool], rng: random.Random) -> str:
    """One caption naming exactly the attributes flagged in ``named``, with synonyms and a template."""
    words = [rng.choice(table[attrs[a]]) for a, table in (("size", SIZE_WORDS), ("color", COLOR_WORDS))
             if named[a]]
    words.append(rng.choice(SHAPE_WORDS[attrs["shape"]]) if named["shape"] else rng.choice(GENERIC_NOUNS))
    desc = " ".join(words)
    where = rng.choice(POSITION_WORDS[attrs["position"]]) if named["position"] else ""
    return rng.choice(TEMPLATES).format(
        a="an" if desc[0] in "aeiou" else "a", desc=desc,
        pos=f" {where}" if where else "", lead=f"{where}, " if where else "")


def _named(rng: random.Random) -> dict[str, bool]:
    """Which attributes a caption names: all of them, or (OMIT_SHARE of the time) all but one to three."""
    omitted = rng.sample(ATTRIBUTES, rng.choice((1, 1, 2, 3))) if rng.random() < OMIT_SHARE else ()
    return {a: a not in omitted for a in ATTRIBUTES}


# ---------------------------------------------------------------- an item


def draw_item(seed: int, split: str, index: int) -> tuple[dict, list[str]]:
    """Attributes (with which ones each caption names) and captions of item ``index`` of a split.

    Attributes and captions come from separate random streams seeded by strings (hashed with
    SHA-512 by ``random``, so independent of PYTHONHASHSEED): rewording captions never moves a pixel.
    """
    stream = f"shapes/{seed}/{split}/{index}"
    rng = random.Random(stream)
    attrs = {"color": rng.choice(COLORS), "shape": rng.choice(SHAPES), "size": rng.choice(SIZES),
             "position": rng.choice(POSITIONS)}
    attrs["row"], attrs["col"] = divmod(POSITIONS.index(attrs["position"]), 3)
    rng = random.Random(stream + "/captions")
    named = [_named(rng) for _ in range(CAPTIONS_PER_ITEM)]
    captions = [caption(attrs, flags, rng) for flags in named]
    attrs["captions"] = named
    return attrs, captions
