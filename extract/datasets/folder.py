"""folder: images in class sub-folders (the ImageNet layout); the label is the class folder.

Layout: ``<root>/<split>/<class>/<image>`` where ``<root>/<split>`` exists, else ``<root>/<class>/<image>``.
Labels are class indices in sorted folder order, counting empty class folders too, so the labels of
ImageNet's folders are the usual 0..999 whatever a partial copy holds. Keys are the image paths
relative to the class folders' parent without extension ("n01440764/img_001"): stable, readable,
and the same for the same file on every machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from n2n.extract.datasets import DatasetError, ItemDataset, decode_image

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Sub-folder names that mean "split folders", not classes: reading them as classes would be a silent mistake.
SPLIT_NAMES = ("train", "val", "validation", "test")


def layout(root: Path | None) -> str:
    """The expected layout, spelled out for error messages."""
    root = root or "<root>"
    return (f"expected {root}/<split>/<class>/<image> or {root}/<class>/<image> "
            f"with images ending in {', '.join(EXTENSIONS)}")


def _subfolders(path: Path) -> list[str]:
    """Names of the visible sub-folders of ``path``, sorted."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


class FolderDataset(ItemDataset):
    """Images labelled by their class folder."""

    name = "folder"
    modalities = ("image", "label", "attributes")

    def __init__(self, root: str | Path | None, split: str = "train") -> None:
        super().__init__(root, split)
        if self.root is None or not self.root.is_dir():
            raise DatasetError(f"no image folder at {self.root or '(no --data-root given)'}: {layout(self.root)}")
        self.base = self._base()
        self.classes = _subfolders(self.base)
        self.files: list[str] = []  # relative to base, with '/'
        self.labels: list[int] = []
        for label, name in enumerate(self.classes):
            images = sorted(e.name for e in os.scandir(self.base / name)
                            if e.is_file() and e.name.lower().endswith(EXTENSIONS))
            self.files += [f"{name}/{image}" for image in images]
            self.labels += [label] * len(images)
        if not self.files:
            raise DatasetError(f"no images in class folders under {self.base}: {layout(self.root)}")
        self.keys = [os.path.splitext(f)[0] for f in self.files]
        seen: set[str] = set()
        for key in self.keys:
            if key in seen:
                raise DatasetError(f"two images under {self.base} share the name {key} (different extensions): "
                                   "keys are names without extension; rename one")
            seen.add(key)

    def _base(self) -> Path:
        """The folder holding the class folders: ``root/split`` if there is one."""
        if (self.root / self.split).is_dir():
            return self.root / self.split
        splits = [s for s in _subfolders(self.root) if s in SPLIT_NAMES]
        if splits:
            raise DatasetError(f"{self.root} has split folders {', '.join(splits)} but no {self.split}/: "
                               f"pick one of them with --split ({layout(self.root)})")
        return self.root

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return self.keys[self.check_index(index)]

    def attribute_values(self) -> dict[str, list[str]]:
        """One attribute, ``class``: the class folders' names, in sorted order (the labels' order)."""
        return {"class": list(self.classes)}

    def __getitem__(self, index: int) -> dict:
        index = self.check_index(index)
        item = {"key": self.keys[index]}
        if "image" in self.modalities:
            item["image"] = decode_image(self.base / self.files[index], self.keys[index])
        if "label" in self.modalities:
            item["label"] = self.labels[index]
        if "attributes" in self.modalities:
            item["attributes"] = {"class": self.classes[self.labels[index]]}
        return item

    def describe(self) -> dict:
        return {**super().describe(), "base": str(self.base), "classes": self.classes}
