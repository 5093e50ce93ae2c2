"""Views: a translation task as a pair of latent stores joined on the item key.

A view is a directory holding ``view.json`` that names a source and a target store by paths
relative to the view, so a whole shards root can be moved or copied and still open. It copies no
latents: the join is recomputed when asked for (vectorised: about half a second for a million rows).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from n2n.files import as_path, is_remote, write_json_atomic
from n2n.shards.errors import StoreError
from n2n.shards.reader import Store, open_store

VIEW_NAME = "view.json"


class ViewError(StoreError):
    """A view is missing or damaged, or its two stores cannot be joined."""


@dataclass(frozen=True)
class Join:
    """Row pairs of a view: source row source_index[i] translates to target row target_index[i]."""

    source_index: np.ndarray  # int64
    target_index: np.ndarray  # int64
    key: np.ndarray  # str, the shared key of each pair

    def __len__(self) -> int:
        return len(self.key)


class View:
    """Two opened stores and the rule that pairs their rows."""

    def __init__(self, path: Path, source: Store, target: Store):
        self.path = path
        self.name = path.name
        self.source = source
        self.target = target

    def __repr__(self) -> str:
        return f"View({str(self.path)!r}: {self.source.path} -> {self.target.path})"

    def join(self) -> Join:
        """Pair rows by key, in source row order; rows without a partner are dropped.

        Target keys unique: each source row pairs with its key's target row (captions onto images).
        Else source keys unique: each target row pairs with its key's source row (one-to-many).
        Else (key, sub) must be unique on both sides and rows pair on it.
        """
        source, target = _key_codes(self.source.keys, self.target.keys)
        if _is_unique(target):
            source_rows, target_rows = _lookup(target, source)
        elif _is_unique(source):
            target_rows, source_rows = _lookup(source, target)
            order = np.argsort(source_rows, kind="stable")
            source_rows, target_rows = source_rows[order], target_rows[order]
        else:
            source, target = _pair_codes((source, target), (self.source.sub, self.target.sub))
            for store, ids in ((self.source, source), (self.target, target)):
                if not _is_unique(ids):
                    raise ViewError(
                        f"store {store.path} repeats (key, sub) pairs and neither store has unique keys, "
                        f"so the join is ambiguous: run n2n-shards verify {store.path} and re-extract it"
                    )
            source_rows, target_rows = _lookup(target, source)
        if not len(source_rows):
            raise ViewError(
                f"stores {self.source.path} and {self.target.path} share no key: "
                "they were extracted from different datasets; pair stores of the same data"
            )
        return Join(source_rows, target_rows, self.source.keys[source_rows])


# The join works on dense integer codes, equal iff the keys are: then uniqueness is a bincount and
# matching is a table lookup, O(N), no per-row Python and no repeated string comparisons.


def _key_codes(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense int64 codes for the keys of both stores.

    Sorting a million strings costs about a second; hashing them and sorting the hashes costs a
    fraction. Rows whose hashes tie are checked to hold equal keys, and a true collision (odds
    about 1e-7 at a million keys) falls back to sorting the strings themselves.
    """
    keys = np.concatenate([source, target])
    hashes = hash_keys(keys)
    order = np.argsort(hashes, kind="stable")
    ordered_hashes, ordered_keys = hashes[order], keys[order]
    ties = ordered_hashes[1:] == ordered_hashes[:-1]
    if np.any(ties & (ordered_keys[1:] != ordered_keys[:-1])):
        codes = np.unique(keys, return_inverse=True)[1].astype(np.int64)
    else:
        codes = _dense(order, ~ties)
    return codes[: len(source)], codes[len(source) :]


def hash_keys(keys: np.ndarray) -> np.ndarray:
    """64-bit hashes of fixed-width 'U' keys, without per-key Python: FNV-1a over the UCS-4 code
    points (one vector pass per character), then splitmix64's finaliser, so that every bit is
    well mixed and ``hash % n`` buckets evenly (FNV's low bits alone do not)."""
    points = np.ascontiguousarray(keys).view(np.uint32).reshape(len(keys), keys.dtype.itemsize // 4)
    hashes = np.full(len(keys), 0xCBF29CE484222325, dtype=np.uint64)
    for column in points.T:
        hashes ^= column
        hashes *= np.uint64(0x100000001B3)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        hashes ^= hashes >> np.uint64(shift)
        hashes *= np.uint64(multiplier)
    return hashes ^ (hashes >> np.uint64(31))


def _pair_codes(
    key_codes: tuple[np.ndarray, np.ndarray], sub: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Dense int64 codes for the (key, sub) pairs of both stores (integers: a cheap sort)."""
    codes, subs = np.concatenate(key_codes), np.concatenate(sub)
    order = np.lexsort((subs, codes))
    codes, subs = codes[order], subs[order]
    dense = _dense(order, (codes[1:] != codes[:-1]) | (subs[1:] != subs[:-1]))
    return dense[: len(key_codes[0])], dense[len(key_codes[0]) :]


def _dense(order: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Codes in row order, from a sort order and where the sorted values change (len(order) - 1)."""
    steps = np.zeros(len(order), dtype=np.int64)
    steps[1:] = changed
    codes = np.empty(len(order), dtype=np.int64)
    codes[order] = np.cumsum(steps)
    return codes


def _is_unique(codes: np.ndarray) -> bool:
    return not len(codes) or np.bincount(codes).max() <= 1


def _lookup(reference: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Match each query code to the row holding it in `reference` (whose codes are unique).

    Returns (query rows that matched, their reference rows), in query order.
    """
    size = max(reference.max(initial=-1), query.max(initial=-1)) + 1
    row_of = np.full(size, -1, dtype=np.int64)
    row_of[reference] = np.arange(len(reference))
    rows = row_of[query]
    matched = rows >= 0
    return np.flatnonzero(matched), rows[matched]


def _dataset_name(meta: dict) -> str | None:
    dataset = meta.get("dataset")
    return dataset.get("name") if isinstance(dataset, dict) else dataset


def _check_same_data(source: Store, target: Store) -> None:
    """Refuse stores whose meta names different datasets or splits (where both name one)."""
    for field, pick in (("dataset", _dataset_name), ("split", lambda meta: meta.get("split"))):
        a, b = pick(source.meta), pick(target.meta)
        if a is not None and b is not None and a != b:
            raise ViewError(
                f"stores {source.path} ({field} {a!r}) and {target.path} ({field} {b!r}) "
                f"come from different {field}s: pair stores extracted from the same data"
            )


def create_view(path: str | os.PathLike, source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write <path>/view.json pairing two complete stores; refuse pairs that cannot be joined."""
    path, source_path, target_path = as_path(path), as_path(source), as_path(target)
    view = View(path, open_store(source_path), open_store(target_path))
    _check_same_data(view.source, view.target)
    view.join()
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / VIEW_NAME, {"n2n_view": 1, "source": _relative(source_path, path),
                                         "target": _relative(target_path, path)})
    return path


def _relative(store: Path, view: Path) -> str:
    """How view.json names a store: relative to the view on a local disk (a moved shards root still
    opens), the store's URL where either lives behind fsspec."""
    if is_remote(store) or is_remote(view):
        return str(store)
    return os.path.relpath(store.resolve(), view.resolve())


def view_stores(path: str | os.PathLike) -> tuple[Path, Path]:
    """The source and target store paths a view names, without opening them (to inspect a broken view)."""
    path = as_path(path)
    file = path / VIEW_NAME
    if not file.is_file():
        raise ViewError(f"no view at {path}: create one with n2n-shards pair SOURCE TARGET --name NAME")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
        return tuple(as_path(name) if "://" in name else as_path(os.path.normpath(path / name))
                     for name in (spec["source"], spec["target"]))  # type: ignore[return-value]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ViewError(f"invalid {file} ({err}): recreate it with n2n-shards pair") from err


def open_view(path: str | os.PathLike) -> View:
    """Open a view and both its stores (which must be complete)."""
    source, target = view_stores(path)
    return View(as_path(path), open_store(source), open_store(target))


def pair(source: Store | str | os.PathLike, target: Store | str | os.PathLike, name: str | None = None,
         root: str | os.PathLike | None = None) -> View:
    """A view translating ``source``'s latents into ``target``'s (``n2n.pair``; ``n2n-shards pair``).

    Written to ``root/name/view.json``: ``name`` defaults to ``<source>_<target>`` (the stores' folder
    names), ``root`` to the shards root both stores sit under (``shards/<data>/<expert>`` → ``shards``).
    Pairing the same stores again rewrites the same view; nothing is copied.
    """
    source_path, target_path = (as_path(s.path if isinstance(s, Store) else s) for s in (source, target))
    name = name if name is not None else f"{source_path.name}_{target_path.name}"
    if not name or name != os.path.basename(name) or name in (".", ".."):
        raise ViewError(f"view name {name!r}: give a plain folder name, e.g. minilm_ae")
    path = create_view(as_path(root if root is not None else source_path.parent.parent) / name, source_path,
                       target_path)
    return open_view(path)
