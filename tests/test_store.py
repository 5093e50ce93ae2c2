"""Latent stores: round trips, resumable writes, crash safety, conversion, verification, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from itertools import permutations
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from conftest import DIM, LAYOUT

from n2n.shards import (
    FORMATS,
    Layout,
    StoreError,
    convert_store,
    create_store,
    open_store,
    resume_store,
    verify_store,
)

# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("format", FORMATS)
def test_round_trip_keeps_keys_subs_and_latent_bits(tmp_path, format, dtype, rows, write, assert_same_rows):
    data = rows(300, dtype)
    expert = {"spec": "bert@layer3", "digest": "abc"}
    write(tmp_path / "s", data, format, dtype, expert=expert, split="train", note="extra")
    store = open_store(tmp_path / "s")
    assert len(store) == 300 and store.format == format and store.dim == DIM
    assert store.dtype == np.dtype(dtype) and store.complete
    assert_same_rows(store, data)
    assert store.meta["note"] == "extra" and store.meta["n2n_store"] == 1 and store.meta["n2n_version"]
    assert store.identity() == {
        "path": str((tmp_path / "s").resolve()), "format": format, "dim": DIM, "dtype": dtype,
        "count": 300, "expert": expert, "dataset": None, "split": "train",
    }  # fmt: skip
    blocks = list(store.blocks())
    assert len(blocks) > 1  # several write units, read back in order
    assert np.concatenate([b[0] for b in blocks]).tolist() == list(data[0])
    assert np.concatenate([b[2] for b in blocks]).tobytes() == data[2].tobytes()


def test_keys_and_subs_are_read_only(tmp_path, rows, write):
    store = open_store(write(tmp_path / "s", rows(10), "zarr"))
    with pytest.raises(ValueError):
        store.sub[0] = 5


def test_tensor_holds_the_latents(tmp_path, rows, write):
    torch = pytest.importorskip("torch")
    data = rows(40, "float16")
    tensor = open_store(write(tmp_path / "s", data, "zarr")).tensor(dtype=torch.float32)
    assert tensor.dtype == torch.float32 and tensor.shape == (40, DIM)
    assert np.array_equal(tensor.numpy(), data[2].astype(np.float32))


def test_empty_store_round_trips(tmp_path, new_store):
    for format in FORMATS:
        new_store(tmp_path / format, format).close()
        store = open_store(tmp_path / format)
        assert len(store) == 0 and store.latents().shape == (0, DIM) and store.keys.shape == (0,)


def test_meta_json_is_the_documented_record(tmp_path, rows, write):
    write(tmp_path / "s", rows(5), "h5", dataset={"name": "coco"})
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert {k: meta[k] for k in ("format", "dim", "dtype", "count", "complete", "layout")} == {
        "format": "h5", "dim": DIM, "dtype": "float16", "count": 5, "complete": True, "layout": LAYOUT,
    }  # fmt: skip
    assert meta["format_dist"].startswith("n2n ")  # the distribution whose plug-in wrote it
    assert meta["dataset"] == {"name": "coco"} and meta["expert"] is None and meta["split"] is None
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- resumable writing


@pytest.fixture
def write_in_pieces(new_store):
    """``write_in_pieces(path, data, format, cuts, resume_at)``: append in uneven batches, flush and drop
    the writer mid-way (no close), resume, finish."""

    def write(path: Path, data, format: str, cuts: list[int], resume_at: int) -> None:
        writer = new_store(path, format)
        bounds = [0, *cuts, len(data[0])]
        for start, stop in zip(bounds, bounds[1:], strict=False):
            if start == resume_at:
                writer.flush()
                del writer
                writer = resume_store(path)
                assert writer.count == resume_at
            writer.append(*(column[start:stop] for column in data))
        writer.close()

    return write


@pytest.mark.parametrize("format", FORMATS)
def test_pieces_with_resume_equal_one_shot(tmp_path, format, rows, write, write_in_pieces):
    data = rows(333)
    write(tmp_path / "one", data, format)
    write_in_pieces(tmp_path / "pieces", data, format, cuts=[1, 7, 70, 130, 200, 201], resume_at=130)
    one, pieces = open_store(tmp_path / "one"), open_store(tmp_path / "pieces")
    assert pieces.keys.tolist() == one.keys.tolist()
    assert np.array_equal(pieces.sub, one.sub) and pieces.latents().tobytes() == one.latents().tobytes()
    assert verify_store(tmp_path / "pieces") == []


@pytest.mark.parametrize("format", FORMATS)
def test_count_covers_buffered_rows_and_flush_commits_them(tmp_path, format, new_store, rows):
    writer = new_store(tmp_path / "s", format)
    writer.append(*rows(10))
    assert writer.count == 10
    assert len(open_store(tmp_path / "s", require_complete=False)) == 0  # buffered, not committed
    writer.flush()
    assert len(open_store(tmp_path / "s", require_complete=False)) == 10
    writer.append(*rows(200))  # more than a unit: written and committed without a flush
    assert len(open_store(tmp_path / "s", require_complete=False)) >= 50
    assert writer.count == 210


CRASHING_WRITER = """
import os, sys
import numpy as np
from n2n.shards import create_store
path, format = sys.argv[1], sys.argv[2]
data = np.load(sys.argv[3])
writer = create_store(path, dim=data["latents"].shape[1], format=format, chunk_rows=16, unit_rows=64, tar_rows=50)
writer.append(data["keys"][:90], data["sub"][:90], data["latents"][:90])
writer.flush()
writer.append(data["keys"][90:120], data["sub"][90:120], data["latents"][90:120])
os._exit(1)  # dies with 30 rows buffered, without close
"""


@pytest.mark.parametrize("format", FORMATS)
def test_writer_killed_after_flush_leaves_a_resumable_store(tmp_path, format, rows, assert_same_rows):
    data = rows(200)
    np.savez(tmp_path / "data.npz", keys=data[0], sub=data[1], latents=data[2])
    path = tmp_path / "s"
    script = [sys.executable, "-c", CRASHING_WRITER, str(path), format, str(tmp_path / "data.npz")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    assert subprocess.run(script, env=env, check=False).returncode == 1

    with pytest.raises(StoreError, match=r"incomplete \(90 rows committed\)") as err:
        open_store(path)
    assert str(path) in str(err.value)
    assert_same_rows(open_store(path, require_complete=False), tuple(c[:90] for c in data))
    assert any("incomplete" in problem for problem in verify_store(path))

    writer = resume_store(path)
    assert writer.count == 90
    writer.append(*(column[90:] for column in data))
    writer.close()
    assert_same_rows(open_store(path), data)


def rows_on_disk(path: Path, format: str) -> int:
    """Rows the files hold, committed or not: what a resumed store must have cut back."""
    if format == "zarr":
        return max(zarr.open_array(path / name, mode="r").shape[0] for name in ("key", "sub", "latent"))
    if format == "h5":
        with h5py.File(path / "latents.h5", "r") as f:
            return max(f[name].shape[0] for name in ("key", "sub", "latent"))
    return sum(len(tarfile.open(file).getnames()) // 3 for file in path.glob("shard-*"))


@pytest.mark.parametrize("format", FORMATS)
def test_rows_written_but_not_committed_are_dropped_on_resume(tmp_path, format, new_store, rows, assert_same_rows):
    """A crash between writing data and committing meta.json: the extra rows must not survive."""
    data, other = rows(150), rows(250, seed=1)
    path = tmp_path / "s"
    writer = new_store(path, format)
    writer.append(*(column[:100] for column in data))
    writer.flush()
    committed = (path / "meta.json").read_text()
    writer.append(*(column[100:] for column in other))  # 150 rows written ...
    writer.flush()
    (path / "meta.json").write_text(committed)  # ... but the commit never happened
    (path / "shard-000009.tar.tmp").write_bytes(b"half a tar")  # what a crash mid-tar leaves

    writer = resume_store(path)
    assert writer.count == 100
    writer.append(*(column[100:] for column in data))  # only 50 rows this time
    writer.close()
    assert_same_rows(open_store(path), data)
    assert verify_store(path) == []
    assert rows_on_disk(path, format) == 150


@pytest.mark.parametrize("format", FORMATS)
def test_exception_in_context_flushes_but_never_completes(tmp_path, format, new_store, rows):
    with pytest.raises(RuntimeError), new_store(tmp_path / "s", format) as writer:
        writer.append(*rows(30))
        raise RuntimeError("extraction failed")
    store = open_store(tmp_path / "s", require_complete=False)
    assert len(store) == 30 and not store.complete


def test_close_marks_complete_and_ends_the_writer(tmp_path, new_store, rows):
    writer = new_store(tmp_path / "s")
    writer.append(*rows(5))
    assert not json.loads((tmp_path / "s" / "meta.json").read_text())["complete"]
    writer.close()
    assert json.loads((tmp_path / "s" / "meta.json").read_text())["complete"]
    with pytest.raises(StoreError, match="closed"):
        writer.append(*rows(5))
    with pytest.raises(StoreError, match="already complete"):
        resume_store(tmp_path / "s")


# ---------------------------------------------------------------- layout: the sizes of files and writes


def files_of(store) -> list[int]:
    """Rows per file (zarr chunk, tar, HDF5 chunk), as readers see them."""
    return np.diff(store.bounds()).tolist()


@pytest.mark.parametrize("format", FORMATS)
def test_the_layout_is_recorded_and_a_resumed_writer_keeps_it(tmp_path, format, new_store, rows, assert_same_rows):
    data = rows(200)
    writer = new_store(tmp_path / "s", format)
    writer.append(*(column[:30] for column in data))
    writer.flush()
    del writer
    writer = resume_store(tmp_path / "s")
    writer.append(*(column[30:] for column in data))
    writer.close()
    store = open_store(tmp_path / "s")
    assert store.meta["layout"] == LAYOUT and store.layout == Layout(**LAYOUT)
    assert_same_rows(store, data)
    assert files_of(store) == ([30, 50, 50, 50, 20] if format == "wds" else [16] * 12 + [8])  # not tars of 16384


def test_a_store_without_a_recorded_layout_reads_and_resumes_with_the_defaults(tmp_path, rows, assert_same_rows):
    """Stores of an n2n that did not record layout or format_dist: cut as today's defaults cut them."""
    data = rows(3000, "float32")
    for format in FORMATS:
        path = tmp_path / format
        writer = create_store(path, dim=DIM, dtype="float32", format=format)
        writer.append(*(column[:1000] for column in data))
        writer.flush()
        meta = json.loads((path / "meta.json").read_text())
        assert meta["layout"] == {"chunk_rows": 65536, "unit_rows": 65536, "tar_rows": 16384}
        old = {k: v for k, v in meta.items() if k not in ("layout", "format_dist")}
        (path / "meta.json").write_text(json.dumps(old))
        writer = resume_store(path)
        writer.append(*(column[1000:] for column in data))
        writer.close()
        store = open_store(path)
        assert "layout" not in store.meta and store.layout.chunk_rows == 65536
        assert_same_rows(store, data)
        assert files_of(store) == ([1000, 2000] if format == "wds" else [3000]) and verify_store(path) == []


@pytest.mark.parametrize(("name", "value"), [("chunk_rows", 0), ("unit_rows", -64), ("tar_rows", 2.5),
                                             ("chunk_rows", True), ("tar_rows", "50")])
def test_create_refuses_sizes_that_are_not_positive_integers(tmp_path, name, value):
    with pytest.raises(StoreError, match=re.escape(f"cannot create {tmp_path / 's'}: {name}={value!r} is not a "
                                                   "positive integer")):
        create_store(tmp_path / "s", dim=DIM, **{name: value})
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("layout", [{"chunk_rows": 0, "unit_rows": 64, "tar_rows": 50}, {"chunk_rows": 16},
                                    [16, 64, 50], None])
def test_a_bad_recorded_layout_is_refused_naming_meta_json(tmp_path, layout, rows, write):
    path = write(tmp_path / "s", rows(20), "zarr")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "layout": layout}))
    message = re.escape(f"invalid {path / 'meta.json'}: layout")
    for read in (open_store, resume_store):
        with pytest.raises(StoreError, match=message):
            read(path)
    [problem] = verify_store(path)
    assert re.match(message, problem)


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize(("src", "dst"), list(permutations(FORMATS, 2)))
def test_convert_preserves_everything(tmp_path, src, dst, rows, write, assert_same_rows):
    data = rows(170, "float32")
    write(tmp_path / "a", data, src, "float32", expert={"spec": "minilm"}, split="val")
    out = convert_store(tmp_path / "a", tmp_path / "b", dst)
    converted = open_store(out)
    assert converted.format == dst and converted.complete and converted.dtype == np.float32
    assert_same_rows(converted, data)
    assert converted.meta["expert"] == {"spec": "minilm"} and converted.meta["split"] == "val"


def test_convert_keeps_the_layout_but_for_the_sizes_given(tmp_path, rows, write, assert_same_rows):
    data = rows(170)
    write(tmp_path / "a", data, "zarr")
    same = open_store(convert_store(tmp_path / "a", tmp_path / "b", "wds"))
    assert same.meta["layout"] == LAYOUT and files_of(same) == [50, 50, 50, 20]
    other = open_store(convert_store(tmp_path / "b", tmp_path / "c", "wds", tar_rows=100))
    assert other.layout.tar_rows == 100 and files_of(other) == [100, 70] and "wds_shards" in other.meta
    assert_same_rows(other, data)
    back = open_store(convert_store(tmp_path / "c", tmp_path / "d", "zarr", chunk_rows=32))
    assert "wds_shards" not in back.meta and files_of(back) == [32] * 5 + [10]  # the tars' list stays with them


def test_convert_refuses_an_incomplete_source(tmp_path, new_store, rows):
    writer = new_store(tmp_path / "a")
    writer.append(*rows(5))
    writer.flush()
    with pytest.raises(StoreError, match="incomplete"):
        convert_store(tmp_path / "a", tmp_path / "b", "h5")


# ---------------------------------------------------------------- verification


@pytest.mark.parametrize("format", FORMATS)
def test_verify_passes_a_good_store(tmp_path, format, rows, write):
    assert verify_store(write(tmp_path / "s", rows(150), format)) == []


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("bad", ["NaN", "inf"])
def test_verify_finds_nonfinite_latents(tmp_path, format, bad, rows, write):
    keys, sub, latents = rows(150)
    latents[[7, 140], 2] = np.nan if bad == "NaN" else -np.inf
    problems = verify_store(write(tmp_path / "s", (keys, sub, latents), format))
    assert len(problems) == 1 and f"2 rows hold {bad}" in problems[0] and "row 7" in problems[0]


@pytest.mark.parametrize("format", FORMATS)
def test_verify_finds_duplicate_key_sub(tmp_path, format, rows, write):
    keys, sub, latents = rows(150)
    keys[100], sub[100] = keys[3], sub[3]
    problems = verify_store(write(tmp_path / "s", (keys, sub, latents), format))
    assert len(problems) == 1 and "1 duplicate (key, sub)" in problems[0]


@pytest.mark.parametrize("format", FORMATS)
def test_verify_finds_count_beyond_the_data(tmp_path, format, rows, write):
    path = write(tmp_path / "s", rows(150), format)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "count": 151}))
    problems = verify_store(path)
    assert len(problems) == 1 and str(path) in problems[0] and "damaged" in problems[0]


def shard_file(path: Path, format: str) -> Path:
    """A data file of the store: the second latent shard, the second tar, the HDF5 file."""
    files = {
        "zarr": path / "latent" / "c" / "1" / "0",
        "wds": path / "shard-000001.tar",
        "h5": path / "latents.h5",
    }
    return files[format]


@pytest.mark.parametrize("format", FORMATS)
def test_verify_finds_a_truncated_shard(tmp_path, format, rows, write):
    path = write(tmp_path / "s", rows(150), format)
    file = shard_file(path, format)
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    problems = verify_store(path)
    assert len(problems) == 1 and str(path) in problems[0] and "truncated" in problems[0]


@pytest.mark.parametrize("name", ["sub", "latent"])
def test_a_lost_zarr_shard_is_not_read_as_zeros(tmp_path, name, rows, write):
    keys, sub, latents = rows(150)
    path = write(tmp_path / "s", (keys, np.zeros_like(sub), latents), "zarr")  # sub shards all zero
    {"sub": path / "sub" / "c" / "1", "latent": path / "latent" / "c" / "1" / "0"}[name].unlink()
    with pytest.raises(StoreError, match=f"{name} holds"):
        open_store(path)
    assert verify_store(path) and "damaged" in verify_store(path)[0]


def test_wds_refuses_members_outside_the_layout(tmp_path, rows, write):
    path = write(tmp_path / "s", rows(40), "wds")
    with tarfile.open(path / "shard-000000.tar", "w") as tar:
        tar.add(path / "meta.json", arcname="../000000000000.key.txt")
    with pytest.raises(StoreError, match="unexpected member '../000000000000.key.txt'"):
        open_store(path).latents()


# ---------------------------------------------------------------- errors name the path and the fix


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match=f"no latent store at {tmp_path / 'nope'}: run n2n-extract"):
        open_store(tmp_path / "nope")


@pytest.mark.parametrize(
    ("meta_text", "message"),
    [
        (None, "no meta.json"),
        ("{not json", "unreadable"),
        ('{"n2n_store": 1, "format": "parquet", "dim": 4, "dtype": "float16", "count": 0, "complete": true}',
         "unknown format 'parquet'"),
        ('{"format": "zarr"}', "not an n2n store"),
    ],
)  # fmt: skip
def test_bad_meta_json(tmp_path, meta_text, message):
    path = tmp_path / "s"
    path.mkdir()
    if meta_text is not None:
        (path / "meta.json").write_text(meta_text)
    with pytest.raises(StoreError, match=message) as err:
        open_store(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize(("field", "value"), [("dim", DIM + 1), ("dtype", "float32")])
def test_meta_disagreeing_with_the_arrays(tmp_path, format, field, value, rows, write):
    path = write(tmp_path / "s", rows(20), format)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(StoreError, match=str(path)):
        open_store(path).latents()


@pytest.mark.parametrize("format", FORMATS)
def test_a_create_killed_midway_leaves_no_half_store(tmp_path, format, rows, assert_same_rows):
    """A process that dies (os._exit: no cleanup, as kill -9) after the format's files are written and
    before meta.json leaves nothing at the store's path, so the same create then succeeds; the leftover
    .NAME.creating folder is replaced, and n2n-shards ls does not list it."""
    path = tmp_path / "shards" / "s"
    killed = (f"import os, n2n.shards.writer as w; w.write_json_atomic = lambda *a: os._exit(9); "
              f"w.create_store({str(path)!r}, dim={DIM}, format={format!r})")
    assert subprocess.run([sys.executable, "-c", killed], check=False).returncode == 9
    assert not path.exists() and (tmp_path / "shards" / ".s.creating").is_dir()
    from click.testing import CliRunner

    from n2n.shards.cli import main as n2n_shards

    assert ".creating" not in CliRunner().invoke(n2n_shards, ["ls", str(tmp_path / "shards")]).output
    with create_store(path, dim=DIM, format=format) as writer:
        writer.append(*rows(7))
    assert_same_rows(open_store(path), rows(7))
    assert not (tmp_path / "shards" / ".s.creating").exists()


def test_create_refuses_an_existing_store(tmp_path, rows, write):
    path = write(tmp_path / "s", rows(5), "zarr")
    with pytest.raises(StoreError, match=f"{path} already exists and is not empty: resume it"):
        create_store(path, dim=DIM)


@pytest.mark.parametrize(
    "kwargs",
    [{"format": "parquet"}, {"dtype": "int8"}, {"dim": 0}, {"meta": {"count": 3}}],
)
def test_create_refuses_bad_arguments(tmp_path, kwargs):
    with pytest.raises(StoreError, match=str(tmp_path / "s")):
        create_store(tmp_path / "s", **{"dim": DIM, **kwargs})


@pytest.mark.parametrize(
    "batch",
    [
        (["a", "b"], [0, 0], np.zeros((2, DIM + 1))),  # wrong dim
        (["a", "b"], [0, 0], np.zeros(DIM)),  # not 2-D
        (["a"], [0, 0], np.zeros((2, DIM))),  # keys shorter than latents
        (["a", "b"], [0], np.zeros((2, DIM))),  # subs shorter than latents
        ([1, 2], [0, 0], np.zeros((2, DIM))),  # keys not strings
        (["a", "b"], [0.5, 1.0], np.zeros((2, DIM))),  # subs not integers
        (["a", "b"], [0, 0], np.zeros((2, DIM), dtype=np.int32)),  # latents not floats
    ],
)
def test_append_validates_batches(tmp_path, batch, new_store):
    writer = new_store(tmp_path / "s")
    with pytest.raises(StoreError, match=f"append to {tmp_path / 's'}"):
        writer.append(*batch)
    assert writer.count == 0


def test_a_store_with_a_sharded_latent_array_still_reads(tmp_path, rows, write, assert_same_rows):
    """Stores of n2n before plain chunks kept `latent` in zarr's sharding codec: they stay readable."""
    data = rows(150)
    path = write(tmp_path / "s", data, "zarr")
    old = zarr.create_array(path / "latent", shape=(150, DIM), dtype="float16", chunks=(16, DIM), shards=(64, DIM),
                            compressors=None, fill_value=0, overwrite=True)
    old[:] = data[2]
    store = open_store(path)
    assert zarr.open_array(path / "latent", mode="r").shards == (64, DIM)
    assert_same_rows(store, data)


def test_zarr_latents_are_plain_chunks_and_a_cut_one_is_refused_at_open(tmp_path, rows, write):
    path = write(tmp_path / "s", rows(150), "zarr")
    assert zarr.open_array(path / "latent", mode="r").shards is None
    file = path / "latent" / "c" / "9" / "0"  # the last chunk: rows 144..149 of 16-row chunks
    file.write_bytes(file.read_bytes()[:-2])  # the bytes lost lie beyond the committed rows
    with pytest.raises(StoreError, match=f"{file} holds"):
        open_store(path)
