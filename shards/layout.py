"""How a store's rows are cut into files and writes: three sizes, chosen at creation, kept in meta.json.

- ``chunk_rows``: rows per latent chunk of a zarr array or HDF5 dataset, what a reader fetches at once
  (``Store.take``, streamed views). Default about 3 MB of latents, a power of two from 64 to 65536.
- ``unit_rows``: rows per write of a zarr or HDF5 store (and per chunk of its key and sub columns).
  Writing part of a zarr chunk is a read-modify-write, so the writer buffers whole units. Default 64
  chunks, at most 65536 rows, so that a write buffer stays under 200 MB.
- ``tar_rows``: rows per webdataset tar, which cannot be appended to. Default 16384: tens of MB of
  typical latents, few files to list, small enough to stream and to redo.

``create_store(chunk_rows=..., unit_rows=..., tar_rows=...)`` sets them (tests use tiny ones so that
a few hundred rows span many files); meta.json records them under ``layout``, so that a resumed
writer cuts files as the first one did. A store written before they were recorded gets the defaults,
which are the sizes that wrote it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

NAMES = ("chunk_rows", "unit_rows", "tar_rows")
TAR_ROWS = 16384


def default_chunk_rows(dim: int, dtype: str) -> int:
    """~3 MB of rows (a power of two from 64 to 65536): about 4096 rows of 384 float16."""
    row_bytes = dim * np.dtype(dtype).itemsize
    return 2 ** int(np.clip(round(math.log2(3 * 2**20 / row_bytes)), 6, 16))


def size_problem(name: str, value: object) -> str | None:
    """Why ``value`` cannot be the size ``name`` (a positive integer), or None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return None
    return f"{name}={value!r} is not a positive integer"


def layout_problem(recorded: object) -> str | None:
    """What is wrong with a recorded ``layout`` (from meta.json), or None."""
    if not isinstance(recorded, dict) or set(recorded) != set(NAMES):
        return f"layout must hold {', '.join(NAMES)}"
    problem = next(filter(None, (size_problem(name, recorded[name]) for name in NAMES)), None)
    return problem and f"layout {problem}"


@dataclass(frozen=True)
class Layout:
    """The sizes that cut one store's rows into files and writes (see the module's docstring)."""

    chunk_rows: int
    unit_rows: int
    tar_rows: int

    @classmethod
    def new(cls, dim: int, dtype: str, chunk_rows: int | None = None, unit_rows: int | None = None,
            tar_rows: int | None = None) -> Layout:
        """The given sizes, and the defaults for ``dim`` and ``dtype`` in place of those not given."""
        chunk = default_chunk_rows(dim, dtype) if chunk_rows is None else chunk_rows
        return cls(chunk, min(65536, 64 * chunk) if unit_rows is None else unit_rows,
                   TAR_ROWS if tar_rows is None else tar_rows)

    @classmethod
    def of(cls, meta: dict) -> Layout:
        """A store's layout: as recorded in its meta, else (an older store) the defaults that wrote it."""
        recorded = meta.get("layout")
        return cls(**recorded) if recorded is not None else cls.new(meta["dim"], meta["dtype"])

    def record(self) -> dict:
        """The layout as meta.json records it."""
        return asdict(self)
