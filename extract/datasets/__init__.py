"""Datasets: named sources of items (a unique string key plus an image, captions and/or a label).

A dataset name is found through ``n2n.plugins`` (kind "dataset", entry-point group
``n2n.datasets``); n2n's own (biggan, coco, folder, shapes, wds) are entry points of n2n's
pyproject.toml like anyone's. A module is imported only when its dataset is opened, so asking for
``shapes`` never imports the BigGAN generator.

What a plug-in implements: a subclass of ``ItemDataset`` (its docstring is the contract), declared
as ``[project.entry-points."n2n.datasets"] mydata = "mypkg.data:MyDataset"`` (or, in a running
process, ``n2n.register_dataset("mydata", MyDataset)``). ``open_dataset`` builds it as
``cls(root, split, **options)``; the options are the user's ``--data-option KEY=VALUE`` pairs,
so the constructor checks each one (``check_option``) before it reads or writes anything.
"""

from __future__ import annotations

import copy
import inspect
import io
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from n2n import plugins
from n2n.errors import N2NError
from n2n.options import check_value
from n2n.shards import Store

MODALITIES = ("image", "text", "label", "attributes")


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
    """A map-style dataset of keyed items: the contract of every dataset, built-in or plug-in.

    Extraction indexes items in order, cuts batches at fixed item boundaries (so a resumed run
    repeats exactly) and decodes items in DataLoader worker processes. So a subclass

    - sets ``name`` (what stores record) and ``modalities``: which of "image", "text", "label" (or
      a modality of its own, like biggan's) its items carry; an instance may narrow it;
    - takes ``(root, split, **options)``, calls ``super().__init__(root, split)`` and checks every
      option (``check_option``) before it reads or writes anything: a problem the user can fix is a
      ``DatasetError`` with a one-line message;
    - implements ``__len__``, ``key(index)`` (a unique string, without decoding anything) and
      ``__getitem__(index)``: {"key": key(index), and one entry per modality in ``self.modalities``}
      with "image" a PIL RGB image, "text" a list of captions, "label" an int, "attributes" a dict of the
      item's labels by name (what the ``label`` expert reads; ``attribute_values`` lists them). An unusable item
      raises ``ItemError``: the loop records it by key and goes on;
    - is deterministic: the same options and index give the same item in every process and run
      (seed random streams from strings or numbers, never from ``hash()`` or global state);
    - is picklable and holds no open file across a fork (open files lazily, per process);
    - may override ``attributes(index)`` (the ground truth of synthetic data) and extend
      ``describe()`` with whatever else distinguishes its data (a seed, a year);
    - may override ``prepare(...)``: one-off work on the extraction's device before items are read
      (biggan with a captioner renders and captions its items once).
    """

    name: str = ""
    modalities: tuple[str, ...] = ()
    plugin: str | None = None  # the distribution that provides it ("n2n 0.1.0"), set by open_dataset

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

    def prepare(self, indices: range, workdir: Path, device: torch.device, console: Console) -> None:
        """Make what reading items ``indices`` needs and no loader worker can make cheaply; the default: nothing.

        Extraction calls it in the main process, on its device, after ``with_modalities`` and before
        any item is read; workers then get the prepared dataset. ``workdir`` is the folder of this
        dataset's stores (``shards/<data>/``): what is cached there serves every store of the same data
        and survives a crash, so a rerun only makes what is missing.
        """

    def attribute_values(self) -> dict[str, list[str]]:
        """The labels its items' "attributes" carry: each attribute's name and its values, in a fixed order
        (the ``label`` expert's one-hot codes follow it). The default: none."""
        return {}

    @classmethod
    def translation_scorer(cls) -> object | None:
        """What ``n2n.evaluate`` measures on a run over this dataset beyond the held-out NLL: a
        ``n2n.scoring.TranslationScorer``, handed the held-out pairs and the run's translator and MLP
        baseline to compare (shapes: a judge reads decoded samples). None, the default: the NLL alone."""
        return None

    def describe(self) -> dict:
        """What a store's meta records about its dataset, so stores of different data never pair."""
        return {"name": self.name, "root": None if self.root is None else str(self.root), "split": self.split,
                "count": len(self), "plugin": self.plugin}

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


def check_option(dataset: str, name: str, value: object, **rule: object) -> None:
    """``n2n.options.check_value`` for one option of ``dataset``: a DatasetError naming the option and its
    allowed range (``rule``: integer, min, max, above, below, choices, optional, as check_value takes)."""
    try:
        check_value(name, value, **rule)
    except N2NError as err:
        allowed = str(err).rpartition(": ")[2]  # check_value's message ends with the rule, e.g. "must be >= 1"
        raise DatasetError(f"dataset {dataset}: option {name} = {value!r} {allowed} "
                           f"(--data-option {name}=VALUE)") from err


def known_datasets() -> list[str]:
    """The names ``open_dataset`` accepts (installed plug-ins and n2n's own), sorted."""
    return plugins.names("dataset")


def dataset_class(name: str) -> tuple[type[ItemDataset], str]:
    """The class registered as dataset ``name`` and the distribution that provides it; an unknown name,
    or a plug-in that fails to import or is not an ``ItemDataset`` subclass, is a DatasetError naming
    the known datasets or the plug-in."""
    try:
        found = plugins.find("dataset", name)
        cls = found.load() if found else None
    except plugins.PluginError as err:  # an import failure or a name claimed twice
        raise DatasetError(str(err)) from err
    if found is None:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(known_datasets())}")
    if not (isinstance(cls, type) and issubclass(cls, ItemDataset)):
        what = getattr(cls, "__qualname__", type(cls).__name__)
        raise DatasetError(f"dataset {name!r}: the {found.where} is {what}, not a subclass of n2n.ItemDataset")
    return cls, found.dist


def open_dataset(name: str, root: str | Path | None = None, split: str = "train", **options) -> ItemDataset:
    """The dataset ``name`` over ``root``; an unknown name or option, or a bad plug-in (``dataset_class``),
    raises DatasetError."""
    cls, dist = dataset_class(name)
    try:
        inspect.signature(cls).bind(root, split, **options)
    except TypeError as err:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("root", "split")]
        raise DatasetError(f"dataset {name}: {err}; its options are {', '.join(accepted) or 'none'}") from err
    dataset = cls(root, split, **options)
    dataset.plugin = dist
    return dataset


def reopen_dataset(record: dict) -> ItemDataset:
    """The dataset a store was extracted from, opened again from the store's record of it (its meta's
    "dataset" entry): with the options the extraction was given, or for stores that do not record them,
    with the entries of the dataset's description that its class takes as options."""
    cls, _ = dataset_class(record["name"])
    options = record.get("options")
    if options is None:
        taken = set(inspect.signature(cls).parameters) - {"root", "split"}
        options = {key: value for key, value in record.items() if key in taken}
    return open_dataset(record["name"], record.get("root"), record.get("split", "train"), **options)


__all__ = [
    "MODALITIES",
    "DatasetError",
    "ItemDataset",
    "ItemError",
    "check_captions",
    "check_option",
    "dataset_class",
    "decode_image",
    "known_datasets",
    "open_dataset",
    "reopen_dataset",
]


def read_captions(store: Store, rows: np.ndarray) -> list[str]:
    """The caption of each of ``store``'s ``rows``: its dataset item (by key) and caption number (sub)."""
    dataset = reopen_dataset(store.meta["dataset"]).with_modalities(["text"])
    wanted = {str(key) for key in store.keys[rows]}
    index = {}
    for i in range(len(dataset)):
        key = dataset.key(i)
        if key in wanted:
            index[key] = i
            if len(index) == len(wanted):
                break
    return [dataset[index[str(key)]]["text"][int(sub)] for key, sub in zip(store.keys[rows], store.sub[rows],
                                                                           strict=True)]
