"""Where n2n writes: local paths or fsspec URLs, and writes that readers never see half-done.

Every stage writes through these (stores, runs, reports), so they sit below all of them.

A store's path may be an fsspec URL (``s3://``, ``gs://``, ``memory://``): it is then a
``upath.UPath`` with pathlib's API, and a file is replaced by one PUT (which object stores make
atomic) where a local file is written aside and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


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
    """``obj`` as indented UTF-8 JSON, written atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def remove_tree(path: Path) -> None:
    """Delete a folder and everything in it, locally or at a URL; a missing one is fine."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)
