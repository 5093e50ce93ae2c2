"""Writing a store: ``create_store`` and ``resume_store`` give the one ``StoreWriter`` that appends rows.

The writer buffers rows and hands the format's backend whole units (a zarr write unit, a tar):
writing part of a zarr chunk is a read-modify-write, and a tar cannot be appended to. The data is
written first and the row count in meta.json is committed afterwards, atomically, so a crash never
exposes half-written rows and ``resume_store`` continues at the committed count. A store becomes
``complete`` atomically too, and readers refuse incomplete stores by default.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from n2n.files import as_path, is_remote, remove_tree, write_json_atomic
from n2n.shards.backend import Backend, Block
from n2n.shards.errors import StoreError, StoreWriteError
from n2n.shards.formats import backend_of, load_format
from n2n.shards.layout import Layout, size_problem
from n2n.shards.lock import Lock, hold
from n2n.shards.meta import DTYPES, META_NAME, RESERVED_META, read_meta, version


class StoreWriter:
    """Appends rows to one store; buffers them into whole write units and commits after each write.

    Use it as a context manager: a clean exit closes (marks complete); an exception flushes what is
    buffered and leaves the store incomplete, ready for ``resume_store``.
    """

    def __init__(self, path: Path, meta: dict, backend: Backend, lock: Lock | None = None):
        self.path = path
        self._meta = meta
        self._backend = backend
        self._lock = lock  # one writer per store (shards.lock): released on close, or when the process ends
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
            try:
                self.flush()
            finally:
                self.release()

    def release(self) -> None:
        """Let another writer in (close does it; a writer given up without closing should too)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def append(self, keys: Sequence[str], sub: Sequence[int] | np.ndarray, latents: np.ndarray) -> None:
        """Buffer one batch; whenever a whole unit (a zarr or HDF5 write unit, a tar) is buffered, write and
        commit it."""
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
        self.release()

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
    chunk_rows: int | None = None,
    unit_rows: int | None = None,
    tar_rows: int | None = None,
) -> StoreWriter:
    """Create an empty store at ``path`` (a new or empty directory) and return its writer.

    ``format``: zarr, wds, h5 or a plug-in's (``format_names()``). ``meta``: descriptive keys (expert,
    dataset, split, ...). ``chunk_rows``, ``unit_rows``, ``tar_rows``: how rows are cut into files and
    writes (``n2n.shards.layout``; defaults by dim and dtype), recorded so that a resumed writer keeps them.
    """
    path = as_path(path)
    extra = dict(meta or {})
    if dtype not in DTYPES or not isinstance(dim, int) or dim < 1:
        raise StoreError(f"cannot create {path} as dtype={dtype!r} dim={dim!r}: use a dtype of {DTYPES} and a "
                         "positive dim")
    sizes = {"chunk_rows": chunk_rows, "unit_rows": unit_rows, "tar_rows": tar_rows}
    bad = [problem for name, value in sizes.items() if value is not None and (problem := size_problem(name, value))]
    if bad:
        raise StoreError(f"cannot create {path}: {'; '.join(bad)}: give positive row counts, or none for the defaults")
    backend, dist = load_format(format, path)
    owned = (RESERVED_META | set(backend.state_keys)) & extra.keys()
    if owned:
        raise StoreError(
            f"meta for {path} sets {sorted(owned)}, which the store owns: "
            "pass only expert/dataset/split and other descriptive keys"
        )
    lock = hold(path)
    existed = path.exists()
    if existed and (not path.is_dir() or any(path.iterdir())):
        if lock is not None:
            lock.release()
        raise StoreError(
            f"{path} already exists and is not empty: "
            "resume it (rerun the command that writes it) or delete it"
        )
    full = {
        "n2n_store": 1,
        "format": format,
        "format_dist": dist,
        "dim": dim,
        "dtype": dtype,
        "count": 0,
        "complete": False,
        "n2n_version": version(),
        "layout": Layout.new(dim, dtype, **sizes).record(),
        "expert": None,
        "dataset": None,
        "split": None,
        **extra,
    }
    try:
        _make(path, full, backend, existed)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return StoreWriter(path, full, backend(path, full), lock)


def _make(path: Path, meta: dict, backend: type[Backend], existed: bool) -> None:
    """The store's files and meta.json at ``path``, so that no half store is ever left there."""
    if is_remote(path):  # no atomic rename: meta.json last, so a folder without it is no store
        path.mkdir(parents=True, exist_ok=True)
        try:
            backend.create(path, meta)
        except BaseException:
            if not existed:  # what a failed create made would refuse the next, correct command
                remove_tree(path)
            raise
        write_json_atomic(path / META_NAME, meta)
        return
    making = path.with_name(f".{path.name}.creating")  # made whole beside it and renamed into place
    remove_tree(making)  # one a killed create left
    making.mkdir(parents=True)
    try:
        backend.create(making, meta)
        write_json_atomic(making / META_NAME, meta)
        os.replace(making, path)  # path is absent or an empty folder, which a rename replaces
    except BaseException:
        remove_tree(making)
        raise


def resume_store(path: str | os.PathLike) -> StoreWriter:
    """Reopen an incomplete store for appending at its committed count; uncommitted rows are dropped."""
    path = as_path(path)
    meta = read_meta(path)
    if meta["complete"]:
        raise StoreError(
            f"store {path} is already complete ({meta['count']} rows): "
            "nothing to resume; delete it to rewrite"
        )
    lock = hold(path)  # before truncating: another writer's uncommitted rows are its own
    try:
        meta = read_meta(path)  # again, under the lock: what the last writer committed
        backend = backend_of(path, meta)
        found = backend(path, meta)
        found.check()
        found.truncate()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return StoreWriter(path, meta, backend(path, meta), lock)
