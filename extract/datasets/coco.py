"""coco: MS-COCO captions (2014 or 2017 layout): one item per image, with all of its captions.

Layout: ``<root>/annotations/captions_<split><year>.json`` and the images in ``<root>/<split><year>/``
under the ``file_name`` the JSON gives. Items are in image-id order and keyed by the image id, so
an image store and a caption store of the same split join on the key; the captions of an image
are in annotation-id order, so caption j is the same sentence in every run (the store's ``sub``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from n2n.extract.datasets import DatasetError, ItemDataset, check_captions, check_option, decode_image

YEARS = (2017, 2014)
SPLITS = ("train", "val")


def layout(root: Path | None, split: str, year: int | str) -> str:
    """The expected layout, spelled out for error messages."""
    return (f"expected {root or '<root>'}/annotations/captions_{split}{year}.json and images in "
            f"{root or '<root>'}/{split}{year}/ (COCO 2014 or 2017 layout)")


class CocoDataset(ItemDataset):
    """COCO images with their captions; ``year`` 2017 by default, 2014 where only 2014 is there."""

    name = "coco"
    modalities = ("image", "text")

    def __init__(self, root: str | Path | None, split: str = "train", year: int | None = None) -> None:
        super().__init__(root, split)
        if split not in SPLITS:
            raise DatasetError(f"coco has captioned splits {', '.join(SPLITS)}, not {split!r}")
        check_option(self.name, "year", year, choices=YEARS, optional=True)
        if self.root is None or not self.root.is_dir():
            raise DatasetError(f"no COCO folder at {self.root or '(no --data-root given)'}: "
                               f"{layout(self.root, split, year or 2017)}")
        self.year = self._pick_year(year)
        self.image_dir = self.root / f"{split}{self.year}"
        if not self.image_dir.is_dir():
            raise DatasetError(f"no image folder {self.image_dir}: {layout(self.root, split, self.year)}")
        self.ids, self.files, self.captions = self._index(self._annotations_path(self.year))

    def _annotations_path(self, year: int) -> Path:
        return self.root / "annotations" / f"captions_{self.split}{year}.json"

    def _pick_year(self, year: int | None) -> int:
        """The asked year, or 2017 if its captions exist, else 2014: users point at whichever they downloaded."""
        candidates = YEARS if year is None else (int(year),)
        for y in candidates:
            if self._annotations_path(y).is_file():
                return y
        raise DatasetError(f"no COCO captions JSON {self._annotations_path(candidates[0])}: "
                           f"{layout(self.root, self.split, candidates[0])}")

    def _index(self, path: Path) -> tuple[list[int], list[str], list[tuple[str, ...]]]:
        """Image ids (sorted), their file names and their captions in annotation-id order."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
            by_image = defaultdict(list)
            for ann in data["annotations"]:
                by_image[int(ann["image_id"])].append((int(ann["id"]), str(ann["caption"])))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{path} is not a COCO captions file ({type(err).__name__}: {err}): "
                               f"{layout(self.root, self.split, self.year)}") from err
        stray = sorted(set(by_image) - set(images))
        if stray:
            raise DatasetError(f"{path} has captions for image id {stray[0]} that its images list lacks "
                               f"({len(stray)} such ids): the file is damaged or edited; download it again")
        ids = sorted(images)
        return ids, [images[i] for i in ids], [tuple(c for _, c in sorted(by_image[i])) for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def key(self, index: int) -> str:
        return str(self.ids[self.check_index(index)])

    def __getitem__(self, index: int) -> dict:
        index = self.check_index(index)
        key = str(self.ids[index])
        item = {"key": key}
        if "text" in self.modalities:
            item["text"] = check_captions(key, self.captions[index])
        if "image" in self.modalities:
            item["image"] = decode_image(self.image_dir / self.files[index], key)
        return item

    def describe(self) -> dict:
        return {**super().describe(), "year": self.year}
