"""The zarr store format (the default): one zarr v3 group of three arrays, ``key``, ``sub`` and ``latent``.

Full reads run at ``np.load``'s speed through the zarrs codec pipeline; a store may live at an fsspec
URL (zarr opens it through its fsspec store).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from n2n.files import zarr_location
from n2n.shards.backend import COLUMNS, Block, as_unicode, check_columns
from n2n.shards.errors import StoreError
from n2n.shards.layout import Layout
from n2n.shards.meta import META_NAME


class ZarrBackend:
    """One zarr v3 group in the store directory: plain chunks (~3 MB), no compression, no sharding.

    Why not zarr's sharding codec: both zarr-python and zarrs read a sharded array at about a fifth
    of np.load's speed (1M x 384 float16, this repo's bench.store_reads), plain chunks through the
    zarrs codec pipeline at np.load's own. Rows are still written in units (64k rows by default:
    whole chunks, and the key and sub arrays' chunk), so no write is a read-modify-write but the last.
    """

    state_keys = ()

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta

    @classmethod
    def create(cls, path: Path, meta: dict) -> None:
        dim, dtype, layout = meta["dim"], meta["dtype"], Layout.of(meta)
        rows, chunk = layout.unit_rows, layout.chunk_rows
        group = zarr.open_group(**zarr_location(path), mode="w", zarr_format=3)
        # keys and subs are small: one chunk per write unit.
        group.create_array("key", shape=(0,), dtype=str, chunks=(rows,), compressors=None)
        group.create_array("sub", shape=(0,), dtype="int64", chunks=(rows,), compressors=None, fill_value=0)
        group.create_array("latent", shape=(0, dim), dtype=dtype, chunks=(chunk, dim), compressors=None,
                           fill_value=0)

    def _open(self, mode: str) -> dict[str, zarr.Array]:
        # write_empty_chunks: an all-zero `sub` chunk must still exist on disk, else a lost file
        # and a chunk of zeros would look the same and check() could not tell them apart. (An array
        # takes its runtime config from the global one when opened; open_array ignores `config=`.)
        try:
            with zarr.config.set({"array.write_empty_chunks": True}):
                return {name: zarr.open_array(**zarr_location(self.path / name), mode=mode) for name in COLUMNS}
        except Exception as err:
            raise StoreError(
                f"cannot open the zarr arrays in {self.path} ({err}): the store is damaged: "
                "delete it and rerun"
            ) from err

    @cached_property
    def arrays(self) -> dict[str, zarr.Array]:
        return self._open("r")

    @cached_property
    def writable(self) -> dict[str, zarr.Array]:
        return self._open("r+")

    @property
    def unit_rows(self) -> int:
        """Rows per write: the key array's chunk (stores of an older n2n shard `latent` by as many)."""
        return self._file_rows(self.arrays["key"])

    @cached_property
    def fast_latent(self) -> zarr.Array:
        """`latent` opened with the zarrs codec pipeline (Rust, threaded, decodes into the output):
        np.load's speed on plain chunks where zarr-python's own pipeline manages a third of it."""
        with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):  # URLs: zarr's own
            return zarr.open_array(**zarr_location(self.path / "latent"), mode="r")

    def check(self) -> None:
        count, latent = self.meta["count"], self.arrays["latent"]
        if latent.dtype != np.dtype(self.meta["dtype"]) or latent.shape[1] != self.meta["dim"]:
            raise StoreError(
                f"{self.path}/latent is {latent.dtype} [*, {latent.shape[1]}] but {META_NAME} says "
                f"{self.meta['dtype']} [*, {self.meta['dim']}]: the store is damaged: delete it and rerun"
            )
        check_columns(self.path, self.arrays["key"].dtype, self.arrays["sub"].dtype)
        for name, array in self.arrays.items():
            # zarr reads a missing chunk file as fill values: look for the files themselves (only
            # where the array is long enough: an absurd count must not list files for ever).
            step = self._file_rows(array)
            lost = [] if array.shape[0] < count else [
                file for row in range(0, count, step) if not (file := self._file(name, row)).exists()]
            if array.shape[0] < count or lost:
                raise StoreError(
                    f"{self.path}/{name} holds {array.shape[0]} rows for {count} committed"
                    + (f" and lacks {len(lost)} files (first: {lost[0]})" if lost else "")
                    + ": the store is damaged: delete it and rerun"
                )
        # A plain uncompressed chunk has one size (zarr stores edge chunks whole): a cut file is
        # found here, by its size, even where a reader would only fetch its intact first rows.
        if not latent.shards and not latent.compressors and not latent.filters:
            size = math.prod(latent.chunks) * latent.dtype.itemsize
            for row in range(0, count, latent.chunks[0]):
                if (file := self._file("latent", row)).stat().st_size != size:
                    raise StoreError(
                        f"{file} holds {file.stat().st_size} bytes, not a chunk's {size}: the file is "
                        "truncated or corrupt: delete the store and rerun n2n-extract"
                    )

    @staticmethod
    def _file_rows(array: zarr.Array) -> int:
        """Rows per stored file: a chunk, or a shard where the array is sharded."""
        return array.shards[0] if array.shards else array.chunks[0]

    def _file(self, name: str, row: int) -> Path:
        """The file that holds `row` of one array, named by zarr's own chunk-key encoding."""
        array = self.arrays[name]
        coords = (row // self._file_rows(array),) + (0,) * (array.ndim - 1)
        return self.path / name / array.metadata.encode_chunk_key(coords)

    def truncate(self) -> None:
        for array in self.writable.values():
            array.resize((self.meta["count"], *array.shape[1:]))

    def block_rows(self) -> int:
        return self.unit_rows - self.meta["count"] % self.unit_rows

    def write(self, keys: np.ndarray, sub: np.ndarray, latents: np.ndarray) -> None:
        start = self.meta["count"]
        stop = start + len(keys)
        for name, values in zip(COLUMNS, (keys, sub, latents), strict=True):
            array = self.writable[name]
            array.resize((stop, *array.shape[1:]))
            array[start:stop] = values

    def _read(self, name: str, start: int, stop: int, array: zarr.Array | None = None) -> np.ndarray:
        """Rows [start, stop) of one array; a corrupt file becomes a StoreError naming it."""
        array = self.arrays[name] if array is None else array
        try:
            return array[start:stop]
        except Exception as err:
            raise StoreError(
                f"cannot read {self._bad_file(name, start, stop)} ({type(err).__name__}: {err}): the file is "
                "truncated or corrupt: delete the store and rerun n2n-extract"
            ) from err

    def _bad_file(self, name: str, start: int, stop: int) -> Path | str:
        """The first file of rows [start, stop) that does not read (file by file: only after a failure)."""
        step = self._file_rows(self.arrays[name])
        for row in range(start - start % step, stop, step):
            try:
                self.arrays[name][row : min(row + step, stop)]
            except Exception:
                return self._file(name, row)
        return f"rows {start}-{stop} of {self.path / name}"

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        count = self.meta["count"]
        return as_unicode(self._read("key", 0, count)), self._read("sub", 0, count)

    def blocks(self) -> Iterator[Block]:
        count, step = self.meta["count"], self.unit_rows
        for start in range(0, count, step):
            stop = min(count, start + step)
            yield (
                self._read("key", start, stop),
                self._read("sub", start, stop),
                self._read("latent", start, stop),
            )

    def bounds(self) -> np.ndarray:
        return np.r_[np.arange(0, self.meta["count"], self._file_rows(self.arrays["latent"])), self.meta["count"]]

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        return self._read("latent", start, stop, self.fast_latent)
