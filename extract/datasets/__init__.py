"""Datasets: named sources of items (a unique string key plus an image, captions and/or a label).

Every adapter is a map-style ``ItemDataset``: the extraction loop indexes items in order, cuts
batches at fixed item boundaries (so a resumed run repeats exactly) and decodes in DataLoader
workers, so a dataset must be picklable, hold no open file across a fork, and give the same item
for the same (options, index) every time. Adapters are imported only when opened, so asking for
``shapes`` never imports the BigGAN generator.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import io
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from n2n.errors import N2NError

MODALITIES = ("image", "text", "label")

# name -> (module, class); the module is imported by open_dataset only.
_REGISTRY = {
    "biggan": ("n2n.extract.datasets.biggan", "BigGANDataset"),
    "coco": ("n2n.extract.datasets.coco", "CocoDataset"),
    "folder": ("n2n.extract.datasets.folder", "FolderDataset"),
    "shapes": ("n2n.extract.datasets.shapes", "ShapesDataset"),
    "wds": ("n2n.extract.datasets.wds", "WdsDataset"),
}


class DatasetError(N2NError):
    """A dataset cannot be opened; the one-line message names the path or name and the fix."""


class ItemError(Exception):
    """One item cannot be used (unreadable image, empty caption): the loop records it by key and goes on."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason

    def __reduce__(self):
        # Raised in loader workers and re-raised in the main process: pickle the two fields, not the message.
        return type(self), (self.key, self.reason)


class ItemDataset(torch.utils.data.Dataset, ABC):
    """A map-style dataset of keyed items; subclasses set ``name`` and ``modalities``."""

    name: str = ""
    modalities: tuple[str, ...] = ()

    def __init__(self, root: str | Path | None, split: str) -> None:
        self.root = Path(root) if root is not None else None
        self.split = split

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def key(self, index: int) -> str:
        """The key of item ``index``, without decoding anything."""

    @abstractmethod
    def __getitem__(self, index: int) -> dict:
        """{"key", and each modality in ``self.modalities``}; ItemError for an unusable item."""

    def attributes(self, index: int) -> dict | None:
        """Ground-truth attributes of item ``index``; only synthetic datasets know them."""
        self.check_index(index)
        return None

    def describe(self) -> dict:
        """What a store's meta records about its dataset, so stores of different data never pair."""
        return {"name": self.name, "root": None if self.root is None else str(self.root), "split": self.split,
                "count": len(self)}

    def with_modalities(self, modalities: Iterable[str]) -> ItemDataset:
        """A copy that decodes only ``modalities``: a text expert over COCO need not decode every JPEG,
        and an image expert is not stopped by an item whose caption is empty."""
        asked = set(modalities)
        if not asked or not asked <= set(self.modalities):
            raise DatasetError(f"dataset {self.name} has modalities {', '.join(self.modalities)}; "
                               f"select one or more of them, not {', '.join(sorted(asked)) or 'none'}")
        wanted = tuple(m for m in self.modalities if m in asked)
        selected = copy.copy(self)
        selected.modalities = wanted
        return selected

    def check_index(self, index: int) -> int:
        """``index`` as a non-negative int; IndexError past either end, as a sequence would raise."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.name} index {index} out of range for {n} items")
        return int(index) % n


def decode_image(source: bytes | Path, key: str) -> Image.Image:
    """An RGB image decoded in full now, so a corrupt or truncated file fails here as an ItemError."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        where = "" if isinstance(source, bytes) else f" {source}"
        raise ItemError(key, f"unreadable image{where}: {err}") from err


def check_captions(key: str, captions: Iterable[str]) -> list[str]:
    """Captions stripped of surrounding whitespace; an empty list or an empty caption is an ItemError,
    since embedding "" would store a latent that means nothing under the item's key."""
    texts = [str(c).strip() for c in captions]
    if not texts:
        raise ItemError(key, "no caption")
    if not all(texts):
        raise ItemError(key, f"empty caption (caption {texts.index('')} of {len(texts)})")
    return texts


def known_datasets() -> list[str]:
    """The names ``open_dataset`` accepts, sorted."""
    return sorted(_REGISTRY)


def open_dataset(name: str, root: str | Path | None = None, split: str = "train", **options) -> ItemDataset:
    """The dataset ``name`` over ``root``; unknown names and options raise DatasetError naming the known ones."""
    if name not in _REGISTRY:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}")
    module, cls_name = _REGISTRY[name]
    cls = getattr(importlib.import_module(module), cls_name)
    try:
        inspect.signature(cls).bind(root, split, **options)
    except TypeError as err:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("root", "split")]
        raise DatasetError(f"dataset {name}: {err}; its options are {', '.join(accepted) or 'none'}") from err
    return cls(root, split, **options)


__all__ = [
    "MODALITIES",
    "DatasetError",
    "ItemDataset",
    "ItemError",
    "check_captions",
    "decode_image",
    "known_datasets",
    "open_dataset",
]
