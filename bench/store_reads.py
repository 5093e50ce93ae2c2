"""Store reads and writes: loading a 1M x 384 float16 store per format vs np.load of the same
bytes; building a view's training arrays (1M caption rows joined onto 200k image rows), the join
against a per-row dict; writing per format, and n2n-extract (the real MiniLM on shapes captions)
into webdataset tars against zarr.

Both sides of a read come from the page cache (each file is read once before timing), so the ratio
compares the formats' decoding work, not the disk. Run: python -m bench.store_reads [--rows N]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from bench.common import Row, report, timed
from n2n.extract.run import ExtractConfig, run_extraction
from n2n.shards import FORMATS, create_store, open_store
from n2n.shards.view import create_view, open_view
from n2n.train.data import load_pairs

READ_TARGET = 0.5  # of raw np.load speed, for every format
JOIN_TARGET_S = 2.0
EXTRACT_TARGET = 1.1  # wds extraction's wall time over zarr's


def write(path: Path, keys: np.ndarray, sub: np.ndarray, latents: np.ndarray, fmt: str) -> Path:
    writer = create_store(path, dim=latents.shape[1], dtype="float16", format=fmt)
    for i in range(0, len(keys), 100_000):
        writer.append(keys[i : i + 100_000], sub[i : i + 100_000], latents[i : i + 100_000])
    writer.close()
    return path


def extraction_s(out: Path, fmt: str, items: int) -> float:
    """Wall seconds of n2n-extract of the real MiniLM over ``items`` shapes items into ``fmt``."""
    config = ExtractConfig(expert="minilm", data="shapes", out=out, format=fmt, limit=items, num_workers=1,
                           device="cpu", overwrite=True)
    start = time.perf_counter()
    run_extraction(config)
    return time.perf_counter() - start


def per_row_join(source, target) -> np.ndarray:
    """The baseline: a dict from key to target row, looked up once per source row in Python."""
    row_of = {k: i for i, k in enumerate(target.keys.tolist())}
    return np.array([row_of[k] for k in source.keys.tolist()])


@click.command()
@click.option("--rows", default=1_000_000, help="Rows of the read benchmark's store (and caption rows of the join).")
@click.option("--dim", default=384)
@click.option("--repeat", default=3, help="Timed repetitions; the best counts.")
@click.option("--extract-items", default=1000, help="shapes items of the extraction rows (0: skip them).")
def main(rows: int, dim: int, repeat: int, extract_items: int) -> None:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((rows, dim), dtype=np.float32).astype(np.float16)
    keys = np.char.add("k", np.arange(rows).astype("U7"))
    raw: dict = {}
    out: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="n2n-bench-") as tmp:
        tmp = Path(tmp)
        npy = tmp / "latents.npy"
        np.save(npy, latents)
        np.load(npy, allow_pickle=False)
        raw["npy_s"] = timed(lambda: np.load(npy, allow_pickle=False), repeat)
        for fmt in FORMATS:
            start = time.perf_counter()
            path = write(tmp / fmt, keys, np.zeros(rows, np.int64), latents, fmt)
            raw[f"{fmt}_write_s"] = time.perf_counter() - start
            assert np.array_equal(open_store(path).latents(), latents)  # and warms the page cache
            raw[f"{fmt}_read_s"] = timed(lambda p=path: open_store(p).latents(), repeat)
            ratio = min(raw["npy_s"]) / min(raw[f"{fmt}_read_s"])
            out.append(Row(f"load {rows:,} x {dim} float16: {fmt} vs np.load", f"{min(raw[f'{fmt}_read_s']):.3f} s",
                           f"{min(raw['npy_s']):.3f} s", ratio, f">= {READ_TARGET}x", ratio >= READ_TARGET))
            if fmt != "zarr":
                out.append(Row(f"write {rows:,} x {dim} float16: {fmt} vs zarr", f"{raw[f'{fmt}_write_s']:.2f} s",
                               f"{raw['zarr_write_s']:.2f} s", raw[f"{fmt}_write_s"] / raw["zarr_write_s"]))
            shutil.rmtree(path)  # wds takes 3.5 GB for 1M rows: keep one format on disk at a time

        # The join: captions (5 per image) onto images, as a text -> image view holds them.
        images = rows // 5
        write(tmp / "images", keys[:images], np.zeros(images, np.int64),
              rng.standard_normal((images, 256), dtype=np.float32).astype(np.float16), "zarr")
        caption_keys = np.repeat(keys[:images], 5)
        write(tmp / "captions", caption_keys, np.tile(np.arange(5), images), latents[: len(caption_keys)], "zarr")
        view = create_view(tmp / "view", tmp / "captions", tmp / "images")
        opened = open_view(view)
        stores = opened.source, opened.target
        stores[0].keys, stores[1].keys  # noqa: B018  (both joins start from the key columns in memory)
        assert np.array_equal(opened.join().target_index, per_row_join(*stores))
        raw["join_s"] = timed(opened.join, repeat)
        raw["per_row_join_s"] = timed(lambda: per_row_join(*stores), repeat)
        out.append(Row(f"join {len(caption_keys):,} captions onto {images:,} images vs a per-row dict",
                       f"{min(raw['join_s']):.2f} s", f"{min(raw['per_row_join_s']):.2f} s",
                       min(raw["per_row_join_s"]) / min(raw["join_s"])))
        # The first call pays for fresh memory (page faults) as n2n-train does once: that one counts.
        raw["training_arrays_s"] = timed(lambda: load_pairs(view), repeat)
        first = raw["training_arrays_s"][0]
        out.append(Row("the view's training arrays (read, join, split, statistics), first call",
                       f"{first:.2f} s", "", None, f"< {JOIN_TARGET_S:.0f} s", first < JOIN_TARGET_S))
        if extract_items:
            extraction_s(tmp / "warm", "zarr", min(extract_items, 64))  # MiniLM's files into the page cache
            for fmt in ("zarr", "wds") * repeat:  # alternating, so that a slower spell hits both
                raw.setdefault(f"extract_{fmt}_s", []).append(extraction_s(tmp / f"x-{fmt}", fmt, extract_items))
            ratio = min(raw["extract_wds_s"]) / min(raw["extract_zarr_s"])
            out.append(Row(f"n2n-extract minilm, {extract_items} shapes items: wds vs zarr",
                           f"{min(raw['extract_wds_s']):.1f} s", f"{min(raw['extract_zarr_s']):.1f} s", ratio,
                           f"<= {EXTRACT_TARGET}x", ratio <= EXTRACT_TARGET))
    report("store_reads", {"rows": rows, "dim": dim, "repeat": repeat, "extract_items": extract_items}, out, raw)


if __name__ == "__main__":
    main()
