"""The contract of a store format, ``Backend``, and the checks its implementations share.

A format is a class that implements ``Backend``, registered under a name: an entry point of the
``n2n.formats`` group (n2n's own zarr, wds and h5 are declared so in its pyproject.toml), or
``n2n.register_format(name, cls)`` in a running process. ``create_store(format=name)`` records the
name in meta.json, and every reader finds the class again by it (``n2n.shards.formats``).

What the rest of n2n does for every format, so that a backend need not: buffering rows into whole
writes, committing the row count to meta.json after each write (so a crash loses only uncommitted
rows), refusing a store that is incomplete, checking batches, ``take`` and ``verify_store``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from n2n.shards.errors import StoreError

Block = tuple[np.ndarray, np.ndarray, np.ndarray]  # keys (str), sub (int64), latents [rows, dim]
COLUMNS = ("key", "sub", "latent")


class Backend(Protocol):
    """One store format: the rows of one store, in files of its own inside the store's folder.

    The writer and the readers share ``meta`` (meta.json as a dict) with the backend:
    ``meta["count"]`` is the number of committed rows, ``meta["dim"]`` and ``meta["dtype"]`` the
    latents' width and type, and ``Layout.of(meta)`` the sizes of files and writes. A backend may
    keep its own record of its files in meta under the keys it names in ``state_keys`` (wds lists
    its tars there); the writer commits meta.json after every ``write``, so that record is committed
    together with the count. A failure to read damaged data is a ``StoreError`` naming the file.
    """

    state_keys: ClassVar[tuple[str, ...]]  # the meta.json keys this format owns: never given by callers, not copied

    def __init__(self, path: Path, meta: dict) -> None: ...

    @classmethod
    def create(cls, path: Path, meta: dict) -> None:
        """Make the files of an empty store in ``path`` (an empty folder); may set its ``state_keys`` in meta."""

    def check(self) -> None:
        """On open: refuse files that cannot hold the committed rows (missing, short, another dim or dtype)."""

    def truncate(self) -> None:
        """On resume: forget the rows written after the last commit (beyond ``meta["count"]``)."""

    def block_rows(self) -> int:
        """Rows to buffer before the next ``write``: those that complete the file being written."""

    def write(self, keys: np.ndarray, sub: np.ndarray, latents: np.ndarray) -> None:
        """Write rows (keys str, sub int64, latents in the store's dtype) from row ``meta["count"]`` on."""

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        """The keys (strings) and subs (integers) of all committed rows."""

    def blocks(self) -> Iterator[Block]:
        """The committed rows in order, a file (or a write unit) at a time: bounded memory."""

    def bounds(self) -> np.ndarray:
        """The first row of each file, then the row count: what ``Store.take`` reads a file at a time."""

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        """Latents of rows [start, stop): all rows, or rows between two of ``bounds()``."""


MEMBERS = tuple(sorted(name for name in {*vars(Backend), *Backend.__annotations__} if not name.startswith("_")))


def missing_members(cls: object) -> list[str]:
    """The members of ``Backend`` that ``cls`` lacks or has of another kind (all, if it is not a class)."""
    if not isinstance(cls, type):
        return list(MEMBERS)

    def fits(name: str) -> bool:
        value = getattr(cls, name, None)
        return isinstance(value, tuple) if name == "state_keys" else callable(value)

    return [name for name in MEMBERS if not fits(name)]


def check_columns(path: Path, key: np.dtype, sub: np.dtype) -> None:
    """Refuse key and sub columns of foreign types (strings and integers), before any read trips on them."""
    if key.kind not in "UOT" or sub.kind not in "iu":
        raise StoreError(f"{path} holds keys of {key} and subs of {sub}, not strings and integers: not a store "
                         "n2n wrote, or a damaged one: delete it and rerun n2n-extract")


def as_unicode(values: np.ndarray) -> np.ndarray:
    """Keys as fixed-width 'U': zarr returns numpy's variable-width StringDType and h5py objects."""
    if values.dtype.kind == "O":
        return values.astype(str)
    if values.dtype.kind == "U":
        return values
    width = int(np.strings.str_len(values).max(initial=1))
    return values.astype(f"U{width}")
