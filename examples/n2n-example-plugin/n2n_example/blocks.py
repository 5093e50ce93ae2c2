"""blocks: a synthetic captioned-image dataset, one coloured block in one quadrant of a dark image.

Item i is drawn from (seed, split, i) alone, so every process and every run sees the same items;
nothing is read from disk, and the dataset pickles as its few settings. Each image has two captions
("a red block in the top left", "top left: red") and its quadrant as the label. It is the smallest
thing that fulfils the ``n2n.ItemDataset`` contract, options and their range checks included.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from n2n.extract.datasets import DatasetError, ItemDataset, check_option

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")  # row-major: row = index // 2
BACKGROUND = (16, 16, 16)
MAX_COUNT = 1_000_000  # keys have six digits


class BlocksDataset(ItemDataset):
    """Options: ``count`` items, images ``size`` pixels square, ``seed``."""

    name = "blocks"
    modalities = ("image", "text", "label")

    def __init__(self, root: str | Path | None = None, split: str = "train", count: int = 256, size: int = 32,
                 seed: int = 0) -> None:
        super().__init__(None, split)  # nothing is read: a root given out of habit is not recorded
        if not split:
            raise DatasetError("blocks needs a split name (it seeds the items), e.g. train or val")
        check_option(self.name, "count", count, integer=True, min=1, max=MAX_COUNT)
        check_option(self.name, "size", size, integer=True, min=2, max=1024)
        check_option(self.name, "seed", seed, integer=True, min=0)
        self.count, self.size, self.seed = int(count), int(size), int(seed)

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        return f"blocks-{self.split}-{self.check_index(index):06d}"

    def draw(self, index: int) -> tuple[str, int]:
        """(colour, quadrant index) of item ``index``: a string seed, so independent of PYTHONHASHSEED."""
        rng = random.Random(f"blocks/{self.seed}/{self.split}/{self.check_index(index)}")
        return rng.choice(list(COLORS)), rng.randrange(len(QUADRANTS))

    def __getitem__(self, index: int) -> dict:
        color, quadrant = self.draw(index)
        item = {"key": self.key(index)}
        if "image" in self.modalities:
            half = self.size // 2
            row, col = divmod(quadrant, 2)
            image = Image.new("RGB", (self.size, self.size), BACKGROUND)
            image.paste(COLORS[color], (col * half, row * half, (col + 1) * half, (row + 1) * half))
            item["image"] = image
        if "text" in self.modalities:
            item["text"] = [f"a {color} block in the {QUADRANTS[quadrant]}", f"{QUADRANTS[quadrant]}: {color}"]
        if "label" in self.modalities:
            item["label"] = quadrant
        return item

    def describe(self) -> dict:
        return {**super().describe(), "seed": self.seed, "size": self.size}
