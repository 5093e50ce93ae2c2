"""wds: webdataset tar shards, read by index.

Extraction indexes items (fixed batch boundaries make resume exact), but webdataset only streams.
So the tars' headers are read once, when the dataset is opened, and each sample keeps where its
members' bytes lie (tar, offset, size); an item is then one ``pread`` per member, with no index
cached on disk to go stale. Members are grouped into samples by webdataset's own rule: the key is
the member name up to the first dot of its base name (directories may hold dots: "2024.v1/000123"),
members of one sample are adjacent, and "__...__" metadata members are skipped. A field counts by
its last extension ("x.b.jpg" of key "x" is an image), as webdataset's decoders do.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, NamedTuple

from braceexpand import braceexpand

from n2n.extract.datasets import MODALITIES, DatasetError, ItemDataset, ItemError, check_captions, decode_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
JSON_TEXT_FIELDS = ("caption", "text", "captions")
# webdataset's grouping (tariterators.base_plus_ext) and metadata (skip_meta) patterns.
KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
META = re.compile(r"__[^/]*__($|/)")
LAYOUT = ("expected a folder of webdataset .tar shards (or with a <split>/ folder of them), a .tar file, or a "
          "pattern like data/shard-{000..009}.tar; a sample is members <key>.jpg|jpeg|png|webp and "
          "<key>.txt|json|cls")


class Member(NamedTuple):
    """Where a member's bytes lie in its tar, and its last extension (which says how to decode it)."""

    extension: str
    offset: int
    size: int


class Sample(NamedTuple):
    key: str
    tar: int  # index into WdsDataset.tars
    members: tuple[Member, ...]  # only those of a known extension, in tar order


def find_tars(root: str | Path, split: str) -> list[Path]:
    """The tar files ``root`` names: a folder (its ``split`` sub-folder if present), a file, or a pattern."""
    path = Path(root)
    if path.is_dir():
        base = path / split if (path / split).is_dir() else path
        tars = sorted(base.glob("*.tar"))
        if not tars:
            raise DatasetError(f"no .tar files in {base}: {LAYOUT}")
        return tars
    tars: list[Path] = []
    for pattern in braceexpand(str(root)):
        found = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        found = [Path(f) for f in found if Path(f).is_file()]
        if not found:
            raise DatasetError(f"no tar file at {pattern}: {LAYOUT}")
        tars += [f for f in found if f not in tars]
    return tars


def _group(tar_no: int, path: Path) -> list[Sample]:
    """The samples of one tar, from its headers only."""
    samples: list[Sample] = []
    key, members, suffixes = None, [], set()
    end = 0  # where the end-of-archive marker must be
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not info.isreg():
                    continue
                name = info.name
                if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                    raise DatasetError(f"{path} has member {name!r} outside the archive (absolute or '..'): "
                                       "refusing it; rewrite the shard with relative names")
                match = KEY_AND_SUFFIX.match(name)
                if META.match(name) or not match:
                    continue
                prefix, suffix = match.group(1), match.group(2).lower()
                if prefix != key:
                    if key is not None:
                        samples.append(Sample(key, tar_no, tuple(members)))
                    key, members, suffixes = prefix, [], set()
                if suffix in suffixes:
                    raise DatasetError(f"{path} has two members {name!r} in sample {key}: a key must be unique; "
                                       "encode dots of file names in keys (webdataset cuts the key at the first dot)")
                suffixes.add(suffix)
                extension = suffix.rsplit(".", 1)[-1]
                if extension in (*IMAGE_EXTENSIONS, "txt", "json", "cls"):
                    members.append(Member(extension, info.offset_data, info.size))
        # tarfile ends quietly at a cut or damaged header; a complete tar has a zero block there.
        with open(path, "rb") as file:
            file.seek(end)
            if file.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError(f"no end-of-archive marker at byte {end}")
    except (tarfile.TarError, OSError) as err:
        raise DatasetError(f"cannot read {path} as an uncompressed tar ({err}); a crashed writer leaves a "
                           "truncated shard: write it again (compressed tars cannot be indexed: decompress them)"
                           ) from err
    if key is not None:
        samples.append(Sample(key, tar_no, tuple(members)))
    return samples


def _json_captions(key: str, data: bytes) -> list[str]:
    """The captions of a json member: its "caption", "text" or "captions" field (a string or a list)."""
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise ItemError(key, f"unreadable json member: {err}") from err
    field = next((f for f in JSON_TEXT_FIELDS if isinstance(obj, dict) and f in obj), None)
    if field is None:
        raise ItemError(key, f"json member has none of the fields {', '.join(JSON_TEXT_FIELDS)}")
    value = obj[field]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ItemError(key, f"json field {field!r} is neither a string nor a list of strings")


class WdsDataset(ItemDataset):
    """Samples of webdataset tars by index; modalities are those the members provide."""

    name = "wds"

    def __init__(self, root: str | Path | None, split: str = "train") -> None:
        super().__init__(root, split)
        if root is None:
            raise DatasetError(f"wds needs --data-root: {LAYOUT}")
        self.tars = find_tars(root, split)
        self.samples: list[Sample] = []
        seen: dict[str, Path] = {}
        for tar_no, path in enumerate(self.tars):
            for sample in _group(tar_no, path):
                if sample.key in seen:
                    raise DatasetError(f"sample key {sample.key} appears twice ({seen[sample.key]}, {path}): keys "
                                       "must be unique across shards and a sample's members adjacent")
                seen[sample.key] = path
                self.samples.append(sample)
        if not self.samples:
            raise DatasetError(f"no samples in {', '.join(map(str, self.tars))}: {LAYOUT}")
        self._files: dict[int, BinaryIO] = {}
        self.json_text = self._json_has_text()
        kinds = {self._kind(m.extension) for s in self.samples for m in s.members}
        self.modalities = tuple(m for m in MODALITIES if m in kinds)
        if not self.modalities:
            raise DatasetError(f"no image, text or class members in {', '.join(map(str, self.tars))}: {LAYOUT}")

    def _json_has_text(self) -> bool:
        """Whether json members carry captions, judged from the first one: metadata-only json (as in many
        ImageNet shards) must not make every item fail for want of a caption."""
        for sample in self.samples:
            for member in sample.members:
                if member.extension == "json":
                    try:
                        obj = json.loads(self._read(sample, member))
                    except (ValueError, ItemError):
                        return False
                    return isinstance(obj, dict) and any(f in obj for f in JSON_TEXT_FIELDS)
        return False

    def _kind(self, extension: str) -> str | None:
        """The modality a member of this extension provides here, if any."""
        if extension in IMAGE_EXTENSIONS:
            return "image"
        if extension == "txt" or (extension == "json" and self.json_text):
            return "text"
        return "label" if extension == "cls" else None

    def __getstate__(self) -> dict:
        # Open files cannot be pickled (spawned workers): each process opens its own, lazily.
        return {**self.__dict__, "_files": {}}

    def _read(self, sample: Sample, member: Member) -> bytes:
        """A member's bytes. A positional read (pread) moves no shared file offset, so a handle that a
        forked worker inherits is as safe to read from as one it opened itself."""
        if sample.tar not in self._files:
            self._files[sample.tar] = open(self.tars[sample.tar], "rb")  # noqa: SIM115 (kept open for reuse)
        data = os.pread(self._files[sample.tar].fileno(), member.size, member.offset)
        if len(data) != member.size:
            raise ItemError(sample.key, f"{self.tars[sample.tar]} is shorter than when it was indexed")
        return data

    def _member(self, sample: Sample, modality: str) -> Member:
        """The first member of ``sample`` that provides ``modality`` ("txt" before "json" for text)."""
        found = sorted((m for m in sample.members if self._kind(m.extension) == modality),
                       key=lambda m: m.extension == "json")
        if not found:
            raise ItemError(sample.key, f"sample has no {modality} member")
        return found[0]

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, index: int) -> str:
        return self.samples[self.check_index(index)].key

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[self.check_index(index)]
        item = {"key": sample.key}
        if "image" in self.modalities:
            item["image"] = decode_image(self._read(sample, self._member(sample, "image")), sample.key)
        if "text" in self.modalities:
            member = self._member(sample, "text")
            data = self._read(sample, member)
            try:
                texts = [data.decode("utf-8")] if member.extension == "txt" else _json_captions(sample.key, data)
            except UnicodeDecodeError as err:
                raise ItemError(sample.key, f"txt member is not UTF-8: {err}") from err
            item["text"] = check_captions(sample.key, texts)
        if "label" in self.modalities:
            data = self._read(sample, self._member(sample, "label"))
            try:
                item["label"] = int(data.decode("ascii").strip())
            except ValueError as err:  # UnicodeDecodeError is a ValueError too
                raise ItemError(sample.key, f"cls member is not an integer: {data[:40]!r}") from err
        return item

    def describe(self) -> dict:
        return {**super().describe(), "shards": len(self.tars)}
