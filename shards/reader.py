"""Reading a store: ``open_store`` gives a ``Store``, a read-only snapshot of its committed rows.

One reader serves every format: the format's backend reads files, the Store caches the key and sub
columns, reads latents whole, by file (``take``, for streamed views) or by block (bounded memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from n2n.files import as_path, is_remote
from n2n.shards.backend import Block, as_unicode
from n2n.shards.errors import StoreError
from n2n.shards.formats import backend_of
from n2n.shards.layout import Layout
from n2n.shards.meta import RESERVED_META, read_meta

if TYPE_CHECKING:
    import torch


def _frozen(values: np.ndarray) -> np.ndarray:
    """Mark a cached column read-only so that no caller can corrupt what others see."""
    values.flags.writeable = False
    return values


class Store:
    """A read-only snapshot of a store's committed rows; columns are read lazily and cached."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self.format: str = meta["format"]
        self.dim: int = meta["dim"]
        self.dtype = np.dtype(meta["dtype"])
        self.complete: bool = meta["complete"]
        self._backend = backend_of(path, meta)(path, meta)
        self._backend.check()

    def __len__(self) -> int:
        return self.meta["count"]

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, {self.format}, {len(self)} x {self.dim} {self.dtype})"

    @cached_property
    def _columns(self) -> tuple[np.ndarray, np.ndarray]:
        keys, sub = self._backend.columns()
        return _frozen(keys), _frozen(sub.astype(np.int64, copy=False))

    @property
    def layout(self) -> Layout:
        """How the rows are cut into files and writes (what a copy of the store is written with)."""
        return Layout.of(self.meta)

    def origin(self) -> dict:
        """Where the rows come from (expert, dataset, split, ...): the meta less what the store and its
        format own. What a copy of the store, in any format, is created with."""
        return {k: v for k, v in self.meta.items() if k not in RESERVED_META and k not in self._backend.state_keys}

    @property
    def keys(self) -> np.ndarray:
        """Item keys ('U' strings), one per row."""
        return self._columns[0]

    @property
    def sub(self) -> np.ndarray:
        """Sub-indices (int64): caption number, 0 where an item has one latent."""
        return self._columns[1]

    def latents(self) -> np.ndarray:
        """All committed latents [N, dim] in the stored dtype, read in one go."""
        return self._backend.read_latents(0, len(self))

    def bounds(self) -> np.ndarray:
        """The first row of each file (zarr chunk, tar, HDF5 chunk), then the row count: what take() reads."""
        return self._backend.bounds()

    def take(self, rows: np.ndarray) -> np.ndarray:
        """``latents[rows]`` for any row indices, reading only the files (chunks, tars) that hold them,
        one at a time: memory stays the result plus one file. What streaming a view is made of."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise StoreError(f"{self.path}: rows {rows.min()}..{rows.max()} asked of a store of {len(self)} rows: "
                             "the store changed under an open view; open the view again")
        out = np.empty((len(rows), self.dim), self.dtype)
        if not len(rows):
            return out
        bounds = self.bounds()
        file_of = np.searchsorted(bounds, rows, side="right") - 1
        order = np.argsort(file_of, kind="stable")  # the requested rows, grouped by file
        files, starts = np.unique(file_of[order], return_index=True)
        for file, picked in zip(files, np.split(order, starts[1:]), strict=True):
            start, stop = int(bounds[file]), int(bounds[file + 1])
            out[picked] = self._backend.read_latents(start, stop)[rows[picked] - start]
        return out

    def latent_files(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, latents) of each file in turn: a pass over the latents alone, a file in memory."""
        bounds = self.bounds()
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            yield int(start), self._backend.read_latents(int(start), int(stop))

    def blocks(self) -> Iterator[Block]:
        """Committed rows as (keys, sub, latents) blocks of the format's write unit: bounded memory."""
        for keys, sub, latents in self._backend.blocks():
            yield as_unicode(np.asarray(keys)), sub.astype(np.int64, copy=False), latents

    def tensor(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """All latents as a torch tensor on `device` (torch imported here: readers need not have it)."""
        import torch

        return torch.from_numpy(self.latents()).to(device=device, dtype=dtype)

    def identity(self) -> dict:
        """What a checkpoint records about the store it was trained from."""
        return {
            "path": str(self.path if is_remote(self.path) else self.path.resolve()),
            "format": self.format,
            "dim": self.dim,
            "dtype": self.dtype.name,
            "count": len(self),
            "expert": self.meta.get("expert"),
            "dataset": self.meta.get("dataset"),
            "split": self.meta.get("split"),
        }


def open_store(path: str | os.PathLike, *, require_complete: bool = True) -> Store:
    """Open a store for reading; by default refuse one that is still being written (or was cut off)."""
    path = as_path(path)
    meta = read_meta(path)
    if require_complete and not meta["complete"]:
        raise StoreError(
            f"store {path} is incomplete ({meta['count']} rows committed): "
            "rerun the command that writes it to resume"
        )
    return Store(path, meta)
