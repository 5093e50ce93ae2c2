"""Latent stores: the latents of one expert over one dataset, beside their keys, on disk.

A store is a directory holding ``meta.json`` and the rows ``key`` (str), ``sub`` (int64) and
``latent`` [N, dim] in one of three formats: a zarr v3 group (default: fast full reads), webdataset
tar shards (streaming, object stores) or one HDF5 file (import/export). One reader API serves all.

Rows are appended by a single StoreWriter that buffers them and writes whole units (64k zarr rows,
a tar): writing part of a zarr chunk is a read-modify-write, and a tar cannot be appended to. The
data is written first and the row count in meta.json is committed afterwards, atomically, so a
crash never exposes half-written rows and ``resume_store`` continues at the committed count.
A store becomes ``complete`` atomically too, and readers refuse incomplete stores by default.

A store's path may be an fsspec URL (``s3://``, ``gs://``, ``memory://``; zarr and wds stores):
paths are then ``upath.UPath``s, zarr opens them through its fsspec store, and an object is
replaced by one PUT (which object stores make atomic) where a local file is renamed into place.
"""

from __future__ import annotations

import copy
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import zarr

from n2n.errors import N2NError

if TYPE_CHECKING:
    import torch

FORMATS = ("zarr", "wds", "h5")
DTYPES = ("float16", "float32")
META_NAME = "meta.json"
# Keys that describe the stored rows rather than their origin: owned by the store, never by callers.
RESERVED_META = frozenset(
    {"n2n_store", "format", "dim", "dtype", "count", "complete", "n2n_version", "wds_shards"}
)
COLUMNS = ("key", "sub", "latent")
# Rows per tar: tens of MB of typical latents, few files to list, small enough to stream and to redo.
WDS_SHARD_ROWS = 16384

Block = tuple[np.ndarray, np.ndarray, np.ndarray]


class StoreError(N2NError):
    """A store is missing, damaged or misused; the message names the path and what to do."""


class StoreWriteError(StoreError, OSError):
    """A write failed (a full disk: errno ENOSPC); the committed rows stay and the store resumes."""

    def __str__(self) -> str:
        return self.strerror  # the message alone, as every StoreError reads


# ---------------------------------------------------------------- paths and URLs


def as_path(path: str | os.PathLike) -> Path:
    """A local path as a Path, an fsspec URL (s3://, memory://, ...) as a UPath with the same API."""
    if not isinstance(path, str) and (isinstance(path, Path) or is_remote(path)):
        return path  # type: ignore[return-value]  # a Path, or already a UPath
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    if "://" in text:
        from upath import UPath  # fsspec's pathlib: only where a URL is given

        return UPath(text)
    return Path(text)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether a path lives behind fsspec (an object store, memory://) rather than on a local disk."""
    return not isinstance(path, Path) and "://" in str(path) and not str(path).startswith("file://")


def zarr_location(path: Path) -> dict:
    """zarr's arguments for a store at ``path``: the path itself, or the URL and its fsspec options."""
    if not is_remote(path):
        return {"store": path}
    options = dict(getattr(path, "storage_options", {}) or {})
    return {"store": str(path), **({"storage_options": options} if options else {})}


# ---------------------------------------------------------------- meta.json


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file through a temp file in the same directory and os.replace it: readers see old or
    new. At a URL, one PUT of the whole object, which an object store makes visible atomically."""
    if is_remote(path):
        path.write_text(text, encoding="utf-8")
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def is_store(path: Path) -> bool:
    """Whether ``path`` holds a store (its meta.json), finished or not."""
    return (path / META_NAME).exists()


def remove_tree(path: Path) -> None:
    """Delete a folder and everything in it, locally or at a URL; a missing one is fine."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def _version() -> str:
    """The n2n version recorded in every store, so a store says which code wrote it."""
    try:
        return importlib.metadata.version("n2n")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _read_meta(path: Path) -> dict:
    """Load and validate meta.json; every failure names the store and the fix."""
    if not path.exists():
        raise StoreError(f"no latent store at {path}: run n2n-extract or check the path")
    meta_path = path / META_NAME
    if not meta_path.is_file():
        raise StoreError(
            f"no {META_NAME} in {path}: not a latent store (or its creation was interrupted): "
            "check the path, or delete it and rerun the command that writes it"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise StoreError(f"unreadable {meta_path} ({type(err).__name__}: {err}): delete the store and rerun "
                         "n2n-extract") from err
    problem = _meta_problem(meta)
    if problem:
        raise StoreError(f"invalid {meta_path}: {problem}: delete the store and rerun n2n-extract")
    return meta


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with a parsed meta.json, or None."""
    if not isinstance(meta, dict) or meta.get("n2n_store") != 1:
        return 'not an n2n store description (no "n2n_store": 1)'
    if meta.get("format") not in FORMATS:
        return f"unknown format {meta.get('format')!r} (known: {', '.join(FORMATS)})"
    if meta.get("dtype") not in DTYPES:
        return f"unsupported dtype {meta.get('dtype')!r}"
    for field in ("dim", "count"):
        value = meta.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < (field == "dim"):
            return f"bad {field} {value!r}"
    if not isinstance(meta.get("complete"), bool):
        return "bad complete flag"
    return None


# ---------------------------------------------------------------- layout helpers


def _chunk_rows(dim: int, dtype: str) -> int:
    """Rows per chunk: ~3 MB (a power of two), about 4096 rows of 384 float16; few large copies to read."""
    row_bytes = dim * np.dtype(dtype).itemsize
    return 2 ** int(np.clip(round(math.log2(3 * 2**20 / row_bytes)), 6, 16))


def _unit_rows(dim: int, dtype: str) -> int:
    """Rows per zarr / HDF5 write: 65536, fewer for wide rows so a write buffer stays < 200 MB."""
    return min(65536, 64 * _chunk_rows(dim, dtype))


def _as_unicode(values: np.ndarray) -> np.ndarray:
    """Keys as fixed-width 'U': zarr returns numpy's variable-width StringDType and h5py objects."""
    if values.dtype.kind == "O":
        return values.astype(str)
    if values.dtype.kind == "U":
        return values
    width = int(np.strings.str_len(values).max(initial=1))
    return values.astype(f"U{width}")


def _frozen(values: np.ndarray) -> np.ndarray:
    """Mark a cached column read-only so that no caller can corrupt what others see."""
    values.flags.writeable = False
    return values


def _check_columns(path: Path, key: np.dtype, sub: np.dtype) -> None:
    """Refuse key and sub columns of foreign types (strings and integers), before any read trips on them."""
    if key.kind not in "UOT" or sub.kind not in "iu":
        raise StoreError(f"{path} holds keys of {key} and subs of {sub}, not strings and integers: not a store "
                         "n2n wrote, or a damaged one: delete it and rerun n2n-extract")


# ---------------------------------------------------------------- backends (one per format)
#
# Each backend shares the writer's meta dict (count = committed rows) and offers:
# create (empty arrays), check (at open: arrays present, long enough, matching dtype/dim),
# truncate (on resume: forget uncommitted rows), block_rows (rows to buffer before the next
# whole-unit write), write (rows at meta["count"]), columns (keys, sub), blocks, bounds (the first
# row of each file, then the count) and read_latents (rows [start, stop) on file bounds).


class _Zarr:
    """One zarr v3 group in the store directory: plain ~3 MB chunks, no compression, no sharding.

    Why not zarr's sharding codec: both zarr-python and zarrs read a sharded array at about a fifth
    of np.load's speed (1M x 384 float16, this repo's bench.store_reads), plain chunks through the
    zarrs codec pipeline at np.load's own. Rows are still written in units of 64k rows (whole
    chunks, and the key and sub arrays' chunk), so no write is a read-modify-write but the last.
    """

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta

    @staticmethod
    def create(path: Path, meta: dict) -> None:
        dim, dtype = meta["dim"], meta["dtype"]
        rows, chunk = _unit_rows(dim, dtype), _chunk_rows(dim, dtype)
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
        _check_columns(self.path, self.arrays["key"].dtype, self.arrays["sub"].dtype)
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
        return _as_unicode(self._read("key", 0, count)), self._read("sub", 0, count)

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


class _H5:
    """One HDF5 file with resizable chunked datasets; opened per call, never held across a fork."""

    file_name = "latents.h5"

    def __init__(self, path: Path, meta: dict):
        if is_remote(path):
            raise StoreError(f"{path} is an HDF5 store at a URL: HDF5 stores are local files; copy it to a local "
                             "disk, or convert it to zarr (n2n-shards convert)")
        self.path, self.meta = path, meta
        self.file = path / self.file_name

    @classmethod
    def create(cls, path: Path, meta: dict) -> None:
        dim, dtype = meta["dim"], meta["dtype"]
        rows, chunk = _unit_rows(dim, dtype), _chunk_rows(dim, dtype)
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
            _check_columns(self.file, f["key"].dtype, f["sub"].dtype)
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
        return _unit_rows(self.meta["dim"], self.meta["dtype"])

    def write(self, keys: np.ndarray, sub: np.ndarray, latents: np.ndarray) -> None:
        start = self.meta["count"]
        stop = start + len(keys)
        with self._open("a") as f:
            for name, values in zip(COLUMNS, (keys.astype(object), sub, latents), strict=True):
                f[name].resize(stop, axis=0)
                f[name][start:stop] = values

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        count = self.meta["count"]
        return self._read(lambda f: (_as_unicode(f["key"].asstr()[:count]), f["sub"][:count]))

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


class _Wds:
    """webdataset tars ``shard-NNNNNN.tar``; meta["wds_shards"] lists the committed ones with row counts.

    A sample's ``__key__`` is its zero-padded global row index: user keys may hold dots and slashes,
    which would break webdataset's grouping of members into samples.
    """

    fields = ("key.txt", "sub.cls", "latent.npy")
    member = re.compile(r"(\d{12})\.(key\.txt|sub\.cls|latent\.npy)")
    shard_file = re.compile(r"shard-\d{6}\.tar(\.tmp)?")

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta

    @staticmethod
    def create(path: Path, meta: dict) -> None:
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
        return WDS_SHARD_ROWS

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
        return _as_unicode(np.concatenate(keys)), np.concatenate(sub)

    def bounds(self) -> np.ndarray:
        return np.cumsum([0, *(shard["rows"] for shard in self.meta["wds_shards"])])

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop), which must begin and end on tar boundaries (as Store.take asks)."""
        bounds, shards = self.bounds(), self.meta["wds_shards"]
        first, last = np.searchsorted(bounds, [start, stop])
        empty = np.empty((0, self.meta["dim"]), self.meta["dtype"])
        return np.concatenate([empty, *(self._read_tar(self.path / shards[i]["file"], int(bounds[i]),
                                                       shards[i]["rows"])[2] for i in range(first, last))])


_BACKENDS: dict[str, type[_Zarr] | type[_H5] | type[_Wds]] = {"zarr": _Zarr, "wds": _Wds, "h5": _H5}


# ---------------------------------------------------------------- writing


class StoreWriter:
    """Appends rows to one store; buffers them into whole write units and commits after each write.

    Use it as a context manager: a clean exit closes (marks complete); an exception flushes what is
    buffered and leaves the store incomplete, ready for ``resume_store``.
    """

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self._meta = meta
        self._backend = _BACKENDS[meta["format"]](path, meta)
        self._pending: list[Block] = []
        self._pending_rows = 0
        self._closed = False

    @property
    def count(self) -> int:
        """Rows committed plus rows buffered."""
        return self._meta["count"] + self._pending_rows

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self.flush()

    def append(self, keys: Sequence[str], sub: Sequence[int] | np.ndarray, latents: np.ndarray) -> None:
        """Buffer one batch; whenever a whole unit (64k zarr rows, a tar) is buffered, write and commit it."""
        block = self._validate(keys, sub, latents)
        if not len(block[0]):
            return
        self._pending.append(block)
        self._pending_rows += len(block[0])
        while self._pending_rows and self._pending_rows >= self._backend.block_rows():
            self._write(self._backend.block_rows())

    def flush(self) -> None:
        """Write and commit every buffered row (a partial zarr unit, a short tar)."""
        self._check_open()
        if self._pending_rows:
            self._write(self._pending_rows)

    def close(self) -> None:
        """Flush, then mark the store complete (atomically, in meta.json)."""
        self.flush()
        self._meta["complete"] = True
        write_json_atomic(self.path / META_NAME, self._meta)
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the writer of {self.path} is closed: open a new one with resume_store")

    def _validate(self, keys: Sequence[str], sub: Sequence[int] | np.ndarray, latents: np.ndarray) -> Block:
        """Check one batch against the store's schema and convert it to the stored types."""
        self._check_open()
        keys_, sub_, latents_ = np.asarray(keys), np.asarray(sub), np.asarray(latents)
        dim = self._meta["dim"]
        if latents_.ndim != 2 or latents_.shape[1] != dim or latents_.dtype.kind != "f":
            raise StoreError(
                f"append to {self.path}: latents must be floats shaped [rows, {dim}], got "
                f"{latents_.dtype} {latents_.shape}: fix the caller"
            )
        rows = latents_.shape[0]
        if keys_.shape != (rows,) or sub_.shape != (rows,):
            raise StoreError(
                f"append to {self.path}: {len(keys_)} keys, {len(sub_)} subs and {rows} latent rows "
                "must be equal 1-D batches: fix the caller"
            )
        if rows and (keys_.dtype.kind not in "UO" or sub_.dtype.kind not in "iu"):
            raise StoreError(
                f"append to {self.path}: keys must be strings and subs integers, got {keys_.dtype} "
                f"and {sub_.dtype}: fix the caller"
            )
        return keys_.astype(str), sub_.astype(np.int64), latents_.astype(self._meta["dtype"], copy=False)

    def _write(self, rows: int) -> None:
        """Write the first `rows` buffered rows, then commit the new count (data before meta)."""
        columns = [np.concatenate([block[i] for block in self._pending]) for i in range(3)]
        before = copy.deepcopy(self._meta)  # the committed state (the backend shares the dict and edits it)
        try:
            self._backend.write(*(column[:rows] for column in columns))
            self._meta["count"] += rows
            write_json_atomic(self.path / META_NAME, self._meta)
        except OSError as err:  # a full disk, a lost mount: what was committed stays; retry or resume
            self._meta.clear()
            self._meta.update(before)
            raise StoreWriteError(
                err.errno, f"cannot write to {self.path} ({err.strerror or err}): {before['count']} rows are "
                "committed; free space (or fix the path) and rerun the same command to resume"
            ) from err
        rest = tuple(column[rows:] for column in columns)
        self._pending = [rest] if len(rest[0]) else []  # type: ignore[list-item]
        self._pending_rows -= rows


def create_store(
    path: str | os.PathLike,
    *,
    dim: int,
    dtype: str = "float16",
    format: str = "zarr",
    meta: dict | None = None,
) -> StoreWriter:
    """Create an empty store at `path` (a new or empty directory) and return its writer."""
    path = as_path(path)
    extra = dict(meta or {})
    if format not in FORMATS or dtype not in DTYPES or not isinstance(dim, int) or dim < 1:
        raise StoreError(
            f"cannot create {path} as format={format!r} dtype={dtype!r} dim={dim!r}: "
            f"use a format of {FORMATS}, a dtype of {DTYPES} and a positive dim"
        )
    if format == "h5" and is_remote(path):
        raise StoreError(f"cannot create {path}: HDF5 stores are local files; use --format zarr or wds at a URL")
    if RESERVED_META & extra.keys():
        raise StoreError(
            f"meta for {path} sets {sorted(RESERVED_META & extra.keys())}, which the store owns: "
            "pass only expert/dataset/split and other descriptive keys"
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreError(
            f"{path} already exists and is not empty: "
            "resume it (rerun the command that writes it) or delete it"
        )
    path.mkdir(parents=True, exist_ok=True)
    full = {
        "n2n_store": 1,
        "format": format,
        "dim": dim,
        "dtype": dtype,
        "count": 0,
        "complete": False,
        "n2n_version": _version(),
        "expert": None,
        "dataset": None,
        "split": None,
        **extra,
    }
    _BACKENDS[format].create(path, full)
    write_json_atomic(path / META_NAME, full)  # last: a directory with meta.json is a valid store
    return StoreWriter(path, full)


def resume_store(path: str | os.PathLike) -> StoreWriter:
    """Reopen an incomplete store for appending at its committed count; uncommitted rows are dropped."""
    path = as_path(path)
    meta = _read_meta(path)
    if meta["complete"]:
        raise StoreError(
            f"store {path} is already complete ({meta['count']} rows): "
            "nothing to resume; delete it to rewrite"
        )
    backend = _BACKENDS[meta["format"]](path, meta)
    backend.check()
    backend.truncate()
    return StoreWriter(path, meta)


# ---------------------------------------------------------------- reading


class Store:
    """A read-only snapshot of a store's committed rows; columns are read lazily and cached."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self.format: str = meta["format"]
        self.dim: int = meta["dim"]
        self.dtype = np.dtype(meta["dtype"])
        self.complete: bool = meta["complete"]
        self._backend = _BACKENDS[self.format](path, meta)
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
            yield _as_unicode(np.asarray(keys)), sub.astype(np.int64, copy=False), latents

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
    meta = _read_meta(path)
    if require_complete and not meta["complete"]:
        raise StoreError(
            f"store {path} is incomplete ({meta['count']} rows committed): "
            "rerun the command that writes it to resume"
        )
    return Store(path, meta)


# ---------------------------------------------------------------- verification and conversion


def verify_store(path: str | os.PathLike) -> list[str]:
    """Every problem found in a store (empty: ok): unreadable data, NaN/inf, duplicate (key, sub)."""
    try:
        store = open_store(path, require_complete=False)
        problems = [] if store.complete else [f"store {path} is incomplete ({len(store)} rows committed)"]
        return problems + _nonfinite(store) + _duplicates(store)
    except StoreError as err:
        return [str(err)]


def _nonfinite(store: Store) -> list[str]:
    """Rows holding NaN or inf, counted block by block so memory stays bounded."""
    found: dict[str, list[int]] = {"NaN": [], "inf": []}
    start = 0
    for _, _, latents in store.blocks():
        for name, test in (("NaN", np.isnan), ("inf", np.isinf)):
            found[name].extend((np.flatnonzero(test(latents).any(axis=1)) + start).tolist())
        start += len(latents)
    return [
        f"{len(rows)} rows hold {name} (first: row {rows[0]}, key {str(store.keys[rows[0]])!r})"
        for name, rows in found.items()
        if rows
    ]


def _duplicates(store: Store) -> list[str]:
    """(key, sub) pairs that occur more than once: a join on them would be ambiguous."""
    order = np.lexsort((store.sub, store.keys))
    keys, sub = store.keys[order], store.sub[order]
    repeated = order[1:][(keys[1:] == keys[:-1]) & (sub[1:] == sub[:-1])]
    if not len(repeated):
        return []
    first = repeated.min()
    return [
        f"{len(repeated)} duplicate (key, sub) rows (first: row {first}, "
        f"key {str(store.keys[first])!r}, sub {int(store.sub[first])})"
    ]


def convert_store(src: str | os.PathLike, dst: str | os.PathLike, format: str) -> Path:
    """Copy a complete store into a new one of another format, block by block; same meta."""
    source = open_store(src)
    extra = {k: v for k, v in source.meta.items() if k not in RESERVED_META}
    with create_store(dst, dim=source.dim, dtype=source.dtype.name, format=format, meta=extra) as writer:
        for keys, sub, latents in source.blocks():
            writer.append(keys, sub, latents)
    return writer.path
