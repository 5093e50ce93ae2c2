"""Parts of a store written by several processes at once, and their commit into one store.

A distributed extraction gives each rank a contiguous, batch-aligned range of items. Each rank
writes an ordinary store of its own, ``<store>.parts/items-<lo>-<hi>/``, resumable like any other;
the commit then copies the parts, in item order, into ``<store>`` itself. The result holds the rows a
single process would have written, in the same order, with the same meta. Why copy rather than
link: the number of rows per item varies (captions), so no rank knows its rows' final offsets
until all are done, and readers then see one plain store of the usual layout.

The parts are the source of truth until the store is complete: a commit that dies half-way
is redone from them, and only a complete store lets the parts be deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

from n2n.files import as_path, remove_tree, write_text_atomic
from n2n.shards.errors import StoreError
from n2n.shards.meta import is_store
from n2n.shards.reader import Store, open_store
from n2n.shards.writer import create_store

PARTS_SUFFIX = ".parts"
SIDE_FILES = ("errors.jsonl", "attributes.jsonl")  # per-item records that travel with the rows


def parts_dir(store: Path | str) -> Path:
    """Where the parts of ``store`` are written: a sibling folder, ``<store>.parts``."""
    store = as_path(store)
    return store.with_name(store.name + PARTS_SUFFIX)


def part_path(store: Path | str, lo: int, hi: int) -> Path:
    """The part of ``store`` that holds items [lo, hi)."""
    return parts_dir(store) / f"items-{lo:010d}-{hi:010d}"


def part_ranges(items: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Items [0, items) in ``world`` contiguous ranges of whole batches, as equal as batches allow.

    Whole batches, so that every batch is cut at the item boundaries a single process cuts at:
    a deterministic expert then gives bit-identical latents (padding depends on the batch).
    """
    batches = -(-items // batch_size)
    cuts = [min(items, batch_size * (batches * rank // world)) for rank in range(world + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def part_meta(meta: dict, lo: int, hi: int, items: int) -> dict:
    """A part's meta: the store's own, plus which items it holds."""
    return {**meta, "part": {"items": [lo, hi], "of": items}}


def existing_ranges(store: Path | str) -> list[tuple[int, int]]:
    """The item ranges of the parts already on disk (from their folder names), in order."""
    folder = parts_dir(store)
    if not folder.is_dir():
        return []
    ranges = []
    for part in sorted(folder.iterdir()):
        if part.name.startswith("."):  # a part whose creation was cut off (create_store's .NAME.creating)
            continue
        name, _, bounds = part.name.partition("-")
        lo, _, hi = bounds.partition("-")
        if name != "items" or not (lo.isdigit() and hi.isdigit()):
            raise StoreError(f"{part} is not a part of {store} (expected items-<lo>-<hi>): move it out of {folder}")
        ranges.append((int(lo), int(hi)))
    return ranges


def _origin(part: Store) -> dict:
    """What a part says about where its rows come from (the final store's descriptive meta)."""
    return {k: v for k, v in part.origin().items() if k != "part"}


def open_parts(store: Path | str) -> list[Store]:
    """The complete parts of ``store``, checked to tile one range of items and to share one origin."""
    folder = parts_dir(store)
    ranges = existing_ranges(store)
    if not ranges:
        raise StoreError(f"no parts to commit in {folder}: run the distributed extraction first")
    parts = []
    for lo, hi in ranges:
        path = part_path(store, lo, hi)
        try:
            part = open_store(path)
        except StoreError as err:
            raise StoreError(f"part {path} is not finished ({err}): rerun the same extraction command") from err
        if part.meta.get("part", {}).get("items") != [lo, hi]:
            raise StoreError(f"{path} holds items {part.meta.get('part')} but is named for [{lo}, {hi}): "
                             f"delete {folder} and rerun the extraction")
        parts.append(part)
    items = parts[0].meta["part"]["of"]
    bounds = [b for lo_hi in ranges for b in lo_hi]
    if bounds[0] != 0 or bounds[-1] != items or any(a != b for a, b in zip(bounds[1:-1:2], bounds[2::2], strict=True)):
        raise StoreError(f"the parts in {folder} cover items {ranges}, not [0, {items}) without gaps or overlaps: "
                         "rerun the extraction with the process count that wrote them, or delete the folder")
    first = parts[0]
    for part in parts[1:]:
        if _origin(part) != _origin(first) or (part.dim, part.dtype, part.format) != (
            first.dim, first.dtype, first.format
        ):
            raise StoreError(f"{part.path} and {first.path} come from different extractions: "
                             f"delete {folder} and rerun the extraction")
    return parts


def commit_parts(store: Path | str) -> Path:
    """Copy the complete parts of ``store`` into it, in item order; then delete the parts.

    Safe to repeat: an incomplete ``store`` (a commit cut off) is rebuilt from the parts; a complete
    one means the commit happened and only leftover parts are removed.
    """
    store = as_path(store)
    folder = parts_dir(store)
    if is_store(store) and open_store(store, require_complete=False).complete:
        remove_tree(folder)
        return store
    parts = open_parts(store)
    remove_tree(store)  # an earlier commit, cut off: the parts still hold everything
    first = parts[0]
    with create_store(store, dim=first.dim, dtype=first.dtype.name, format=first.format,
                      meta=_origin(first), **first.layout.record()) as writer:
        for part in parts:
            for keys, sub, latents in part.blocks():
                writer.append(keys, sub, latents)
        for name in SIDE_FILES:  # before the store is marked complete: complete means everything is there
            _concatenate([part.path / name for part in parts], store / name)
    remove_tree(folder)
    return store


def _concatenate(files: list[Path], out: Path) -> None:
    """Concatenate the files that exist (JSON lines, in order) into ``out`` atomically; none: no file."""
    present = [f for f in files if f.exists()]
    if not present:
        return
    lines = []
    for file in present:
        for line in file.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                json.loads(line)  # a damaged side file is refused here, not found later
            except json.JSONDecodeError as err:
                raise StoreError(f"{file} has a damaged line ({err}): delete the part and rerun") from err
            lines.append(line + "\n")
    write_text_atomic(out, "".join(lines))
