"""The HDF5 store format, for import and export: one local file, ``latents.h5``, of three datasets.

HDF5 does not survive a write cut off mid-way (a full disk): zarr, the default format, resumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from n2n.files import is_remote
from n2n.shards.backend import COLUMNS, Block, as_unicode, check_columns
from n2n.shards.errors import StoreError
from n2n.shards.layout import Layout
from n2n.shards.meta import META_NAME


class H5Backend:
    """One HDF5 file with resizable chunked datasets; opened per call, never held across a fork."""

    file_name = "latents.h5"
    state_keys = ()

    def __init__(self, path: Path, meta: dict):
        if is_remote(path):
            raise StoreError(f"{path} is an HDF5 store at a URL: HDF5 stores are local files; copy it to a local "
                             "disk, or convert it to zarr (n2n-shards convert)")
        self.path, self.meta = path, meta
        self.file = path / self.file_name

    @classmethod
    def create(cls, path: Path, meta: dict) -> None:
        if is_remote(path):
            raise StoreError(f"cannot create {path}: HDF5 stores are local files; use --format zarr or wds at a URL")
        dim, dtype, layout = meta["dim"], meta["dtype"], Layout.of(meta)
        rows, chunk = layout.unit_rows, layout.chunk_rows
        with h5py.File(path / cls.file_name, "w") as f:
            f.create_dataset("key", shape=(0,), maxshape=(None,), chunks=(rows,), dtype=h5py.string_dtype())
            f.create_dataset("sub", shape=(0,), maxshape=(None,), chunks=(rows,), dtype="int64")
            f.create_dataset("latent", shape=(0, dim), maxshape=(None, dim), chunks=(chunk, dim), dtype=dtype)

    def _open(self, mode: str = "r") -> h5py.File:
        try:
            return h5py.File(self.file, mode)
        except (OSError, ValueError) as err:
            raise StoreError(
                f"cannot open {self.file} ({err}): the file is missing, truncated or corrupt: "
                "delete the store and rerun n2n-extract"
            ) from err

    def _read(self, fn):
        """Run a read on an open file; HDF5 errors on damaged data become a StoreError naming the file."""
        with self._open() as f:
            try:
                return fn(f)
            except (OSError, KeyError, ValueError) as err:
                raise StoreError(
                    f"cannot read {self.file} ({err}): the file is truncated or corrupt: "
                    "delete the store and rerun n2n-extract"
                ) from err

    def check(self) -> None:
        def shapes(f: h5py.File) -> tuple:
            check_columns(self.file, f["key"].dtype, f["sub"].dtype)
            return f["latent"].dtype, f["latent"].shape[1], min(f[name].shape[0] for name in COLUMNS)

        dtype, dim, rows = self._read(shapes)
        if dtype != np.dtype(self.meta["dtype"]) or dim != self.meta["dim"]:
            raise StoreError(
                f"{self.file} holds {dtype} [*, {dim}] but {META_NAME} says {self.meta['dtype']} "
                f"[*, {self.meta['dim']}]: the store is damaged: delete it and rerun"
            )
        if rows < self.meta["count"]:
            raise StoreError(
                f"{self.file} holds {rows} of the {self.meta['count']} committed rows: "
                "the store is damaged: delete it and rerun"
            )

    def truncate(self) -> None:
        try:
            with self._open("a") as f:
                for name in COLUMNS:
                    f[name].resize(self.meta["count"], axis=0)
        except OSError as err:  # HDF5 does not recover a file whose write was cut off (a full disk)
            raise StoreError(
                f"cannot resume {self.file} ({err}): HDF5 files do not survive a write cut off mid-way; its "
                f"{self.meta['count']} committed rows may still read (n2n-shards convert); else delete it and "
                "rerun n2n-extract (zarr, the default format, resumes)"
            ) from err

    def block_rows(self) -> int:
        return Layout.of(self.meta).unit_rows

    def write(self, keys: np.ndarray, sub: np.ndarray, latents: np.ndarray) -> None:
        start = self.meta["count"]
        stop = start + len(keys)
        with self._open("a") as f:
            for name, values in zip(COLUMNS, (keys.astype(object), sub, latents), strict=True):
                f[name].resize(stop, axis=0)
                f[name][start:stop] = values

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        count = self.meta["count"]
        return self._read(lambda f: (as_unicode(f["key"].asstr()[:count]), f["sub"][:count]))

    def blocks(self) -> Iterator[Block]:
        count, step = self.meta["count"], self.block_rows()
        for start in range(0, count, step):
            stop = min(count, start + step)
            yield self._read(
                lambda f, a=start, b=stop: (f["key"].asstr()[a:b], f["sub"][a:b], f["latent"][a:b])
            )

    def bounds(self) -> np.ndarray:
        step = self._read(lambda f: f["latent"].chunks[0])
        return np.r_[np.arange(0, self.meta["count"], step), self.meta["count"]]

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        return self._read(lambda f: f["latent"][start:stop])
