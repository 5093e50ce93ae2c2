"""The webdataset store format, for streaming and object stores: tars of ``tar_rows`` rows each.

A tar cannot be appended to, so each write is one whole tar, written aside and renamed into place
(one PUT at a URL); meta.json lists the committed tars with their row counts (``wds_shards``).
n2n's own tars are periodic and are written and read as whole buffers (``shards.tar_rows``); any
other tar is read member by member with tarfile.
"""

from __future__ import annotations

import io
import mmap
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np

from n2n.files import is_remote
from n2n.shards.backend import Block, as_unicode
from n2n.shards.errors import StoreError
from n2n.shards.layout import Layout
from n2n.shards.meta import META_NAME
from n2n.shards.tar_rows import load_npy, pack, unpack

T, R = TypeVar("T"), TypeVar("R")


def _each(read: Callable[[T], R], tars: list[T]) -> list[R]:
    """``read`` of each tar, on a thread per core: a tar's read is numpy copies and compares, which
    run without the GIL, and the strided rows of a tar keep one core waiting on memory."""
    if len(tars) < 2:
        return [read(tar) for tar in tars]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(min(len(tars), cores)) as pool:
        return list(pool.map(read, tars))


def _buffer(file: Path) -> np.ndarray:
    """A file's bytes: mapped (the page cache, no copy) where local, fetched whole where remote."""
    if is_remote(file):
        return np.frombuffer(file.read_bytes(), np.uint8)
    with file.open("rb") as stream:
        if not os.fstat(stream.fileno()).st_size:
            return np.empty(0, np.uint8)
        populate = getattr(mmap, "MAP_POPULATE", 0)  # Linux: map every page now, not one fault at a time
        mapped = mmap.mmap(stream.fileno(), 0, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
    return np.frombuffer(mapped, np.uint8)  # the mapping lives as long as the array


class WdsBackend:
    """webdataset tars ``shard-NNNNNN.tar``; meta["wds_shards"] lists the committed ones with row counts.

    A sample's ``__key__`` is its zero-padded global row index: user keys may hold dots and slashes,
    which would break webdataset's grouping of members into samples.
    """

    fields = ("key.txt", "sub.cls", "latent.npy")
    member = re.compile(r"(\d{12})\.(key\.txt|sub\.cls|latent\.npy)")
    shard_file = re.compile(r"shard-\d{6}\.tar(\.tmp)?")
    state_keys = ("wds_shards",)

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta

    @classmethod
    def create(cls, path: Path, meta: dict) -> None:
        meta["wds_shards"] = []

    def check(self) -> None:
        shards = self.meta.get("wds_shards")
        valid = isinstance(shards, list) and all(
            isinstance(shard, dict) and isinstance(shard.get("file"), str) and self.shard_file.fullmatch(shard["file"])
            and not shard["file"].endswith(".tmp") and type(shard.get("rows")) is int and shard["rows"] > 0
            for shard in shards)
        if not valid:
            raise StoreError(
                f"{self.path}/{META_NAME}: wds_shards must list {{\"file\": \"shard-NNNNNN.tar\", \"rows\": N}} "
                "entries of this folder: the store is damaged: delete it and rerun"
            )
        if sum(shard["rows"] for shard in shards) != self.meta["count"]:
            raise StoreError(
                f"{self.path}/{META_NAME}: the wds shard list does not add up to the committed count: "
                "the store is damaged: delete it and rerun"
            )
        for shard in self.meta["wds_shards"]:
            if not (self.path / shard["file"]).is_file():
                raise StoreError(
                    f"shard {self.path / shard['file']} is missing: the store is damaged: delete it and rerun"
                )

    def truncate(self) -> None:
        committed = {s["file"] for s in self.meta["wds_shards"]}
        for file in self.path.iterdir():
            if self.shard_file.fullmatch(file.name) and file.name not in committed:
                file.unlink()

    def block_rows(self) -> int:
        return Layout.of(self.meta).tar_rows

    def write(self, keys: np.ndarray, sub: np.ndarray, latents: np.ndarray) -> None:
        """Write one tar under a temp name, then os.replace it: a listed shard is always whole."""
        shards, start = self.meta["wds_shards"], self.meta["count"]
        name = f"shard-{len(shards):06d}.tar"
        remote = is_remote(self.path)
        tmp = self.path / (name if remote else f"{name}.tmp")  # an object is whole once its PUT ends
        tar = pack(start, keys, sub, latents)
        with tmp.open("wb") as stream:
            if tar is not None:
                stream.write(tar.data)
            else:
                self._write_members(stream, start, keys, sub, latents)
            if not remote:
                stream.flush()
                os.fsync(stream.fileno())
        if not remote:
            os.replace(tmp, self.path / name)
        shards.append({"file": name, "rows": len(keys)})

    @staticmethod
    def _write_members(stream: io.BufferedIOBase, start: int, keys: np.ndarray, sub: np.ndarray,
                       latents: np.ndarray) -> None:
        """Rows that are not periodic (a key over 512 bytes), a member at a time, by webdataset itself."""
        from webdataset import TarWriter  # imports torch: only pay for it when writing such tars

        writer = TarWriter(stream, mtime=0)  # an integer mtime: plain ustar headers, no pax records
        for i, (key, s, latent) in enumerate(zip(keys, sub, latents, strict=True)):
            writer.write({"__key__": f"{start + i:012d}", "key.txt": str(key), "sub.cls": int(s), "latent.npy": latent})
        writer.close()

    def _read_tar(self, file: Path, start: int, rows: int, *, latents: bool = True, columns: bool = True) -> Block:
        """Read one tar (never extracted to disk): as one buffer where it is periodic, else by members.
        The columns not asked for may come back as None."""
        try:
            found = unpack(_buffer(file), start, rows, self.meta["dim"], np.dtype(self.meta["dtype"]),
                           latents=latents, columns=columns)
        except (OSError, ValueError) as err:
            raise StoreError(f"cannot read {file} ({err}): the shard is truncated or corrupt: "
                             "delete the store and rerun") from err
        if found is None:
            return self._read_members(file, start, rows)
        return found  # type: ignore[return-value]

    def _read_members(self, file: Path, start: int, rows: int) -> Block:
        """Read one tar member by member; every row must have all three members."""
        keys = np.empty(rows, dtype=object)
        sub = np.empty(rows, dtype=np.int64)
        latent = np.empty((rows, self.meta["dim"]), dtype=self.meta["dtype"])
        seen = np.zeros((rows, len(self.fields)), dtype=bool)
        try:
            with file.open("rb") as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
                for info in tar:
                    row, field = self._locate(info, start, rows)
                    data = tar.extractfile(info).read()  # type: ignore[union-attr]
                    if field == "key.txt":
                        keys[row] = data.decode("utf-8")
                    elif field == "sub.cls":
                        sub[row] = int(data)
                    else:
                        latent[row] = self._vector(data)
                    seen[row, self.fields.index(field)] = True
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            raise StoreError(
                f"cannot read {file} ({err}): the shard is truncated or corrupt: delete the store and rerun"
            ) from err
        if not seen.all():
            raise StoreError(
                f"{file} lacks {int((~seen).sum())} members of its {rows} rows: the shard is truncated: "
                "delete the store and rerun"
            )
        return keys, sub, latent

    def _locate(self, info: tarfile.TarInfo, start: int, rows: int) -> tuple[int, str]:
        """Row and field of a member; anything but our own flat member names is refused (no paths)."""
        match = self.member.fullmatch(info.name)
        if not info.isfile() or not match or not start <= int(match[1]) < start + rows:
            raise ValueError(f"unexpected member {info.name!r}")
        return int(match[1]) - start, match[2]

    def _vector(self, data: bytes) -> np.ndarray:
        vector = load_npy(data)
        if vector.shape != (self.meta["dim"],) or vector.dtype != np.dtype(self.meta["dtype"]):
            raise ValueError(
                f"a latent is {vector.dtype} {vector.shape}, "
                f"meta says {self.meta['dtype']} ({self.meta['dim']},)"
            )
        return vector

    def _tars(self) -> list[tuple[Path, int, int]]:
        """(file, first row, rows) of each committed tar."""
        return [(self.path / shard["file"], int(start), shard["rows"])
                for shard, start in zip(self.meta["wds_shards"], self.bounds(), strict=False)]

    def blocks(self) -> Iterator[Block]:
        for tar in self._tars():
            keys, sub, latents = self._read_tar(*tar)
            yield keys, sub, np.ascontiguousarray(latents)  # a copy, where the fast path gave a view of the file

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        blocks = _each(lambda tar: self._read_tar(*tar, latents=False), self._tars())
        keys = [np.empty(0, "U1"), *(as_unicode(np.asarray(block[0])) for block in blocks)]
        return np.concatenate(keys), np.concatenate([np.empty(0, np.int64), *(block[1] for block in blocks)])

    def bounds(self) -> np.ndarray:
        return np.cumsum([0, *(shard["rows"] for shard in self.meta["wds_shards"])])

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop), which must begin and end on tar boundaries (as Store.take asks)."""
        out = np.empty((stop - start, self.meta["dim"]), self.meta["dtype"])

        def read(tar: tuple[Path, int, int]) -> None:
            file, first, rows = tar
            out[first - start : first - start + rows] = self._read_tar(file, first, rows, columns=False)[2]

        _each(read, [tar for tar in self._tars() if start <= tar[1] < stop])
        return out
