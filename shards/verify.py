"""Checking a store for what a reader cannot see at open (NaN/inf, duplicate keys), and copying it
into another format.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from n2n.shards.errors import StoreError
from n2n.shards.reader import Store, open_store
from n2n.shards.writer import create_store


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


def convert_store(src: str | os.PathLike, dst: str | os.PathLike, format: str, *, chunk_rows: int | None = None,
                  unit_rows: int | None = None, tar_rows: int | None = None) -> Path:
    """Copy a complete store into a new one of another format, block by block: the same rows and origin,
    and the source's layout but for the sizes given (see ``create_store``)."""
    source = open_store(src)
    given = {"chunk_rows": chunk_rows, "unit_rows": unit_rows, "tar_rows": tar_rows}
    sizes = {**source.layout.record(), **{k: v for k, v in given.items() if v is not None}}
    with create_store(dst, dim=source.dim, dtype=source.dtype.name, format=format, meta=source.origin(),
                      **sizes) as writer:
        for keys, sub, latents in source.blocks():
            writer.append(keys, sub, latents)
    return writer.path
