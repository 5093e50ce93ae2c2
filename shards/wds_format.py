"""The webdataset store format, for streaming and object stores: tars of ``tar_rows`` rows each.

A tar cannot be appended to, so each write is one whole tar, written aside and renamed into place
(one PUT at a URL); meta.json lists the committed tars with their row counts (``wds_shards``).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from n2n.shards.backend import Block, as_unicode
from n2n.shards.errors import StoreError
from n2n.shards.layout import Layout
from n2n.shards.meta import META_NAME
from n2n.shards.paths import is_remote


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
        from webdataset import TarWriter  # imports torch: only pay for it when writing tars

        shards, start = self.meta["wds_shards"], self.meta["count"]
        name = f"shard-{len(shards):06d}.tar"
        remote = is_remote(self.path)
        tmp = self.path / (name if remote else f"{name}.tmp")  # an object is whole once its PUT ends
        with tmp.open("wb") as stream:
            writer = TarWriter(stream, mtime=0)  # an integer mtime: plain ustar headers, no pax records
            for i, (key, s, latent) in enumerate(zip(keys, sub, latents, strict=True)):
                writer.write(
                    {
                        "__key__": f"{start + i:012d}",
                        "key.txt": str(key),
                        "sub.cls": int(s),
                        "latent.npy": latent,
                    }
                )
            writer.close()
            if not remote:
                stream.flush()
                os.fsync(stream.fileno())
        if not remote:
            os.replace(tmp, self.path / name)
        shards.append({"file": name, "rows": len(keys)})

    def _read_tar(self, file: Path, start: int, rows: int) -> Block:
        """Read one tar in memory (never extracted to disk); every row must have all three members."""
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
        vector = np.load(io.BytesIO(data), allow_pickle=False)
        if vector.shape != (self.meta["dim"],) or vector.dtype != np.dtype(self.meta["dtype"]):
            raise ValueError(
                f"a latent is {vector.dtype} {vector.shape}, "
                f"meta says {self.meta['dtype']} ({self.meta['dim']},)"
            )
        return vector

    def blocks(self) -> Iterator[Block]:
        start = 0
        for shard in self.meta["wds_shards"]:
            yield self._read_tar(self.path / shard["file"], start, shard["rows"])
            start += shard["rows"]

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        keys, sub = [np.empty(0, object)], [np.empty(0, np.int64)]
        for block_keys, block_sub, _ in self.blocks():  # a tar holds whole samples: latents are read too
            keys.append(block_keys)
            sub.append(block_sub)
        return as_unicode(np.concatenate(keys)), np.concatenate(sub)

    def bounds(self) -> np.ndarray:
        return np.cumsum([0, *(shard["rows"] for shard in self.meta["wds_shards"])])

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop), which must begin and end on tar boundaries (as Store.take asks)."""
        bounds, shards = self.bounds(), self.meta["wds_shards"]
        first, last = np.searchsorted(bounds, [start, stop])
        empty = np.empty((0, self.meta["dim"]), self.meta["dtype"])
        return np.concatenate([empty, *(self._read_tar(self.path / shards[i]["file"], int(bounds[i]),
                                                       shards[i]["rows"])[2] for i in range(first, last))])
