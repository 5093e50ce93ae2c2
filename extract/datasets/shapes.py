"""shapes: an embedded, synthetic captioned-image dataset whose ground truth is known exactly.

Item i is drawn from (seed, split, i) alone: one shape in one colour, of one size, in one cell of a
3x3 grid, on a plain dark background, plus CAPTIONS_PER_ITEM captions from templates with synonyms.
About OMIT_SHARE of the captions leave attributes out on purpose ("a red circle", "a shape in the
middle"), so a text-to-image translator can be checked both for getting the named attributes right
and for varying the ones left open. The picture is a pure function of the four attributes
(``render``), so an evaluator can redraw the ground truth and a judge can read attributes back off
pixels; there is no anti-aliasing and no jitter, and every shape is drawn with flat fills.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from n2n.extract.datasets import DatasetError, ItemDataset, check_option
from n2n.extract.datasets.shapes_world import (  # noqa: F401  (the world's names, read from here too)
    ATTRIBUTES,
    BACKGROUND,
    CAPTIONS_PER_ITEM,
    COLOR_WORDS,
    COLORS,
    DEFAULT_COUNT,
    GENERIC_NOUNS,
    MAX_SIZE,
    MIN_SIZE,
    POSITION_WORDS,
    POSITIONS,
    RGB,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    draw_item,
    render,
)

if TYPE_CHECKING:
    from n2n.extract.datasets.shapes_scoring import ShapesScorer


# ---------------------------------------------------------------- the dataset


class ShapesDataset(ItemDataset):
    """Synthetic captioned shapes; deterministic from (seed, split, index), nothing read from disk."""

    name = "shapes"
    modalities = ("image", "text", "label", "attributes")

    def __init__(self, root: str | Path | None = None, split: str = "train", seed: int = 0, size: int = 64,
                 count: int | None = None) -> None:
        # shapes needs no files: a root passed out of habit (a Makefile default) is not recorded.
        super().__init__(None, split)
        if split not in DEFAULT_COUNT:
            raise DatasetError(f"shapes has splits {', '.join(DEFAULT_COUNT)}, not {split!r}")
        check_option(self.name, "seed", seed, integer=True, min=0)
        check_option(self.name, "size", size, integer=True, min=MIN_SIZE, max=MAX_SIZE)
        check_option(self.name, "count", count, integer=True, min=1, optional=True)
        self.seed, self.size = int(seed), int(size)
        self.count = DEFAULT_COUNT[split] if count is None else int(count)

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return f"shapes-{self.split}-{self.check_index(index):07d}"

    def _draw(self, index: int) -> tuple[dict, list[str]]:
        """Attributes and captions of item ``index`` (``shapes_world.draw_item``)."""
        return draw_item(self.seed, self.split, self.check_index(index))

    def attributes(self, index: int) -> dict:
        """{"color", "shape", "size", "position", "row", "col", "captions": [{attribute: named?}, ...]}."""
        return self._draw(index)[0]

    def __getitem__(self, index: int) -> dict:
        attrs, captions = self._draw(index)
        item = {"key": self.key(index)}
        if "image" in self.modalities:
            item["image"] = render(attrs, self.size)
        if "text" in self.modalities:
            item["text"] = captions
        if "label" in self.modalities:
            item["label"] = SHAPES.index(attrs["shape"])
        if "attributes" in self.modalities:
            item["attributes"] = {name: attrs[name] for name in ATTRIBUTES}
        return item

    def attribute_values(self) -> dict[str, list[str]]:
        """Colour, shape, size and position, each with every value the world draws."""
        return {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}

    @classmethod
    def translation_scorer(cls) -> ShapesScorer:
        """The ground truth makes translations measurable: a judge reads the attributes of decoded samples,
        and retrieved captions are checked against the image (``shapes_scoring``, imported only here)."""
        from n2n.extract.datasets.shapes_scoring import ShapesScorer

        return ShapesScorer()

    def describe(self) -> dict:
        return {**super().describe(), "seed": self.seed, "size": self.size, "captions_per_item": CAPTIONS_PER_ITEM}
