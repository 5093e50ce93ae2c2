"""A store's record, ``meta.json``: what its rows are (format, dim, dtype, count) and where they come from.

The row count in meta.json is the commit: data is written first and the count afterwards,
atomically, so a reader never sees rows that a crash left half-written. Every reader and
``resume_store`` trusts meta.json, so it is checked whole on load; anything but a valid record is
refused naming the file.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from n2n.shards.errors import StoreError
from n2n.shards.layout import layout_problem

META_NAME = "meta.json"
DTYPES = ("float16", "float32")
# Keys that describe the stored rows rather than their origin: owned by the store, never by callers.
# (A format's own record of its files, e.g. wds_shards, is its Backend.state_keys.)
RESERVED_META = frozenset(
    {"n2n_store", "format", "format_dist", "dim", "dtype", "count", "complete", "n2n_version", "layout"}
)


def version() -> str:
    """The n2n version recorded in every store, so a store says which code wrote it."""
    try:
        return importlib.metadata.version("n2n")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def is_store(path: Path) -> bool:
    """Whether ``path`` holds a store (its meta.json), finished or not."""
    return (path / META_NAME).exists()


def read_meta(path: Path) -> dict:
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
    problem = _problem(meta)
    if problem:
        raise StoreError(f"invalid {meta_path}: {problem}: delete the store and rerun n2n-extract")
    return meta


def _problem(meta: Any) -> str | None:
    """What is wrong with a parsed meta.json, or None. (Whether its format is installed is found on open.)"""
    if not isinstance(meta, dict) or meta.get("n2n_store") != 1:
        return 'not an n2n store description (no "n2n_store": 1)'
    if not isinstance(meta.get("format"), str) or not meta["format"]:
        return f"bad format {meta.get('format')!r}"
    if not isinstance(meta.get("format_dist", ""), str):
        return f"bad format_dist {meta['format_dist']!r}"
    if meta.get("dtype") not in DTYPES:
        return f"unsupported dtype {meta.get('dtype')!r}"
    for field in ("dim", "count"):
        value = meta.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < (field == "dim"):
            return f"bad {field} {value!r}"
    if not isinstance(meta.get("complete"), bool):
        return "bad complete flag"
    return layout_problem(meta["layout"]) if "layout" in meta else None
