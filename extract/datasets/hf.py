"""hf: a Hugging Face ``datasets`` dataset as a source, the form most public image-text sets now come in.

``--data-root`` is one of (tried in this order):

- a ``save_to_disk`` folder (``datasets.load_from_disk``);
- a folder of data files ``datasets.load_dataset`` reads as they are: Parquet or Arrow shards, or an
  ``imagefolder`` (images beside a ``metadata.csv`` / ``metadata.jsonl`` of captions);
- a Hub dataset id (``load_dataset(id)``: downloaded into the ``datasets`` cache, or found there offline).

``--split`` picks the split where there are several (``train`` by default). The columns are
``--data-option image_column=... text_column=... key_column=...``, each guessed from the features
where that is unambiguous: the one ``Image`` column, the one column of strings or lists of strings,
and a key column named ``key``, ``id``, ``__key__`` or ``image_id``. Without a key column an item's key
is its row number, and the dataset's fingerprint is recorded in every store, so stores of two
versions of the data never pair. Images are decoded here (corrupt bytes are an item error, listed in
errors.jsonl), captions checked as every dataset's are. ``label_columns=a,b`` names columns whose values
are labels: the ``label`` expert reads them (``label@a``), as one-hot codes of a ClassLabel's names or of the
column's distinct values.

Workers open the dataset again from the same arguments (Arrow tables are memory-mapped: nothing is
copied), so the dataset pickles small and holds no open file across a fork.
"""

from __future__ import annotations

import os
from pathlib import Path

from n2n.extract.datasets import DatasetError, ItemDataset, ItemError, check_captions, decode_image

KEY_NAMES = ("key", "id", "__key__", "image_id")  # a column by one of these names is the key unless told


def load(root: str, split: str):
    """The split ``split`` of the dataset at ``root`` (see the module docstring), its Image columns not decoded."""
    import datasets

    path = Path(root)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            found = datasets.load_from_disk(str(path))
        else:
            found = datasets.load_dataset(str(path) if path.exists() else root)
    except Exception as err:  # datasets raises many kinds: no such path or id, no network, files it cannot read
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetError(f"dataset hf: nothing datasets can read at {root} ({detail}); give a save_to_disk folder, "
                           "a folder of Parquet/Arrow files or images with a metadata file, or a Hub dataset id "
                           "(--data-root)") from err
    if isinstance(found, datasets.DatasetDict):
        if split not in found:
            raise DatasetError(f"dataset hf: {root} has no split {split!r}; its splits: {', '.join(found)} (--split)")
        found = found[split]
    for name, feature in found.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            found = found.cast_column(name, datasets.Image(decode=False))  # decoded here: a bad image is an item error
    return found


def is_text(feature) -> bool:
    """A column of strings, or of lists of strings (several captions per item)."""
    import datasets

    if isinstance(feature, datasets.Value):
        return feature.dtype in ("string", "large_string")
    inner = getattr(feature, "feature", None)  # datasets.List / Sequence / LargeList
    if inner is None and isinstance(feature, list) and len(feature) == 1:
        inner = feature[0]
    return isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")


def pick(root: str, role: str, given: str | None, candidates: list[str], columns: list[str],
         option: str) -> str | None:
    """The column for ``role``: the one given (checked), else the one candidate, else None when there is none."""
    if given is not None:
        if given not in columns:
            raise DatasetError(f"dataset hf: {root} has no column {given!r} ({option}); its columns: "
                               f"{', '.join(columns)}")
        return given
    if len(candidates) > 1:
        raise DatasetError(f"dataset hf: {root} has {len(candidates)} {role} columns ({', '.join(candidates)}): "
                           f"name one with --data-option {option}=NAME")
    return candidates[0] if candidates else None


class HFDataset(ItemDataset):
    """Items of a Hugging Face dataset: an image, captions or both per row, keyed by a column or the row."""

    name = "hf"
    modalities = ("image", "text")

    def __init__(self, root: str | Path | None, split: str = "train", image_column: str | None = None,
                 text_column: str | None = None, key_column: str | None = None,
                 label_columns: str | None = None) -> None:
        super().__init__(root, split)
        if root is None:
            raise DatasetError("dataset hf: no --data-root: give a save_to_disk folder, a folder of Parquet/Arrow "
                               "files or images with a metadata file, or a Hub dataset id")
        try:
            import datasets
        except ImportError as err:
            raise DatasetError("dataset hf needs the datasets package: pip install 'n2n[hf]'") from err
        self.source = str(root)  # as given: a Hub id is not a path
        data = load(self.source, split)
        columns = list(data.features)
        keys = [c for c in columns if c in KEY_NAMES]
        images = [c for c, f in data.features.items() if isinstance(f, datasets.Image)]
        # key_column= (empty) numbers the rows even where a column looks like a key
        self.key_column = None if key_column == "" else pick(self.source, "key", key_column, keys[:1], columns,
                                                             "key_column")
        self.label_columns = [name.strip() for name in (label_columns or "").split(",") if name.strip()]
        for name in self.label_columns:
            if name not in columns:
                raise DatasetError(f"dataset hf: {self.source} has no column {name!r} (label_columns); its columns: "
                                   f"{', '.join(columns)}")
        texts = [c for c, f in data.features.items() if is_text(f) and c != self.key_column and c not in KEY_NAMES
                 and c not in self.label_columns]
        self.image_column = pick(self.source, "image", image_column, images, columns, "image_column")
        self.text_column = pick(self.source, "text", text_column, texts, columns, "text_column")
        if self.image_column is None and self.text_column is None:
            raise DatasetError(f"dataset hf: {self.source} has no Image column and no column of captions (its "
                               f"columns: {', '.join(columns)}); name them with --data-option image_column=NAME or "
                               "text_column=NAME")
        self.modalities = tuple(m for m, c in (("image", self.image_column), ("text", self.text_column)) if c)
        # each label column's values: a ClassLabel's names (its rows hold their index), else its distinct values
        self.values = {name: list(data.features[name].names) if isinstance(data.features[name], datasets.ClassLabel)
                       else sorted({str(value) for value in data[name]}) for name in self.label_columns}
        self.named = {name: isinstance(data.features[name], datasets.ClassLabel) for name in self.label_columns}
        if self.label_columns:
            self.modalities = (*self.modalities, "attributes")
        self.count = len(data)
        self.fingerprint = data._fingerprint
        self.keys = [str(k) for k in data[self.key_column]] if self.key_column else None
        if self.keys is not None and len(set(self.keys)) != len(self.keys):
            raise DatasetError(f"dataset hf: column {self.key_column!r} of {self.source} repeats keys; name a column "
                               "of unique values (--data-option key_column=NAME), or key_column= to number the rows")
        self._data, self._pid = None, None

    @property
    def data(self):
        """The dataset, opened once per process (workers reopen it: memory-mapped, nothing copied)."""
        if self._data is None or self._pid != os.getpid():
            self._data, self._pid = load(self.source, self.split), os.getpid()
        return self._data

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None, "_pid": None}

    def __len__(self) -> int:
        return self.count

    def key(self, index: int) -> str:
        index = self.check_index(index)
        return self.keys[index] if self.keys is not None else f"{index:09d}"

    def __getitem__(self, index: int) -> dict:
        index = self.check_index(index)
        key = self.key(index)
        row = self.data[index]
        item: dict = {"key": key}
        if "image" in self.modalities:
            image = row[self.image_column]
            if not image or not (image.get("bytes") or image.get("path")):
                raise ItemError(key, f"no image in column {self.image_column!r}")
            item["image"] = decode_image(image["bytes"] or Path(image["path"]), key)
        if "text" in self.modalities:
            text = row[self.text_column]
            item["text"] = check_captions(key, [text] if isinstance(text, str) else text or [])
        if "attributes" in self.modalities:
            item["attributes"] = {name: self.values[name][row[name]] if self.named[name] else str(row[name])
                                  for name in self.label_columns}
        return item

    def attribute_values(self) -> dict[str, list[str]]:
        """The label columns (``--data-option label_columns=a,b``), each with its values: a ClassLabel's names,
        else the column's distinct values, sorted."""
        return {name: list(values) for name, values in self.values.items()}

    def describe(self) -> dict:
        columns = {"image": self.image_column, "text": self.text_column, "key": self.key_column,
                   **({"labels": self.label_columns} if self.label_columns else {})}
        record = {**super().describe(), "columns": columns}
        if self.key_column is None:
            record["fingerprint"] = self.fingerprint  # row numbers are keys only within this version of the data
        return record
