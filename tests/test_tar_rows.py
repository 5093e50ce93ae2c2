"""Periodic tars (shards.tar_rows): webdataset's own bytes, read back by strided views, and nothing
but a whole, undamaged n2n tar taken that way (all else goes to the member-by-member reader).

What this suite proves:
* ``pack`` writes the bytes webdataset's TarWriter writes for the same rows (keys with unicode,
  dots and slashes, negative and long subs, float16 and float32), so every tool reads them;
* ``unpack`` returns exactly the packed rows, and None for: a flip of any byte of any member header
  of a row, a flip in a latent's .npy header, a tar cut at any block, a member more, other rows'
  names, another dim or dtype, and rows a tool wrote otherwise (keys over 512 bytes, pax headers);
* a wds store reads the same through both readers (periodic tars and not), webdataset.WebDataset
  reads n2n's tars, and stores written before (by TarWriter) read fast.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset

from n2n.shards import create_store, open_store
from n2n.shards.tar_rows import BLOCK, Offsets, pack, unpack

F16 = np.dtype("float16")


def sample_rows(n: int, dim: int = 6, dtype: str = "float16", seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = np.array([f"img/{i}.jpg" if i % 3 else f"ключ.{i}" * (1 + i % 5) for i in range(n)])
    sub = rng.integers(-5, 10**12, n)
    return keys, sub, rng.standard_normal((n, dim)).astype(dtype)


def tarwriter_bytes(start: int, keys, sub, latents) -> bytes:
    stream = io.BytesIO()
    writer = webdataset.TarWriter(stream, mtime=0)
    for i, (key, s, latent) in enumerate(zip(keys, sub, latents, strict=True)):
        writer.write({"__key__": f"{start + i:012d}", "key.txt": str(key), "sub.cls": int(s), "latent.npy": latent})
    writer.close()
    return stream.getvalue()


@pytest.mark.parametrize(("n", "dim", "dtype"), [(1, 6, "float16"), (37, 6, "float16"), (9, 300, "float32")])
def test_pack_writes_the_bytes_webdataset_writes(n, dim, dtype):
    data = sample_rows(n, dim, dtype)
    assert pack(123, *data).tobytes() == tarwriter_bytes(123, *data)


def test_unpack_returns_the_packed_rows_and_only_the_columns_asked_for():
    keys, sub, latents = sample_rows(37)
    buffer = pack(50, keys, sub, latents)
    got_keys, got_sub, got_latents = unpack(buffer, 50, 37, 6, F16)
    assert got_keys.dtype.kind == "U" and got_keys.tolist() == keys.tolist()
    assert got_sub.dtype == np.int64 and np.array_equal(got_sub, sub)
    assert got_latents.dtype == F16 and got_latents.tobytes() == latents.tobytes()
    assert unpack(buffer, 50, 37, 6, F16, columns=False)[:2] == (None, None)
    assert unpack(buffer, 50, 37, 6, F16, latents=False)[2] is None


def test_rows_that_are_not_periodic_are_not_packed():
    keys, sub, latents = sample_rows(4)
    assert pack(0, np.array(["a", "", "b", "c"]), sub, latents) is None  # an empty key has no data block
    assert pack(0, np.array(["a", "x" * 513, "b", "c"]), sub, latents) is None  # two data blocks
    assert pack(0, np.array(["a", "é" * 256, "b", "c"]), sub, latents).size  # 512 bytes of UTF-8 fit


def flipped(buffer: np.ndarray, at: int) -> np.ndarray:
    damaged = buffer.copy()
    damaged[at] ^= 0xFF
    return damaged


def test_any_flipped_header_byte_or_npy_header_byte_sends_the_tar_to_the_member_reader():
    buffer = pack(0, *sample_rows(5))
    at, row = Offsets(128 + 12), 3
    assert at.stride * 5 < buffer.size and unpack(buffer, 0, 5, 6, F16) is not None
    for header in at.headers:  # every byte of the row's three headers: the checksum sees each
        for byte in range(BLOCK):
            assert unpack(flipped(buffer, row * at.stride + header + byte), 0, 5, 6, F16) is None, (header, byte)
    for byte in range(128):  # the latent's .npy header (magic, version, dtype, shape)
        assert unpack(flipped(buffer, row * at.stride + at.latent_data + byte), 0, 5, 6, F16) is None, byte


def test_a_latent_read_refuses_a_flip_in_whatever_places_or_sizes_a_latent():
    # Reading latents alone checks what decides their values: the member's name (up to its NUL), type,
    # ustar prefix and size, and the .npy header. The rest of a header (owner, mtime, its checksum) is
    # checked where the key and sub columns are read, which every view and verify_store do.
    buffer = pack(0, *sample_rows(5))
    at, row = Offsets(128 + 12), 2
    placed = [*range(24), *range(120, 136), 156, 345]
    for byte in [at.latent_header + b for b in placed] + [at.latent_data + b for b in range(128)]:
        assert unpack(flipped(buffer, row * at.stride + byte), 0, 5, 6, F16, columns=False) is None, byte
    owner = row * at.stride + at.latent_header + 265  # uname: the member is still where and what it was
    assert unpack(flipped(buffer, owner), 0, 5, 6, F16, columns=False) is not None
    assert unpack(flipped(buffer, owner), 0, 5, 6, F16) is None


def test_truncation_extra_members_other_names_and_other_shapes_are_refused():
    keys, sub, latents = sample_rows(5)
    buffer = pack(10, keys, sub, latents)
    stride = Offsets(128 + 12).stride
    for end in range(0, 5 * stride + 2 * BLOCK, BLOCK):  # cut at every block, end markers included
        assert unpack(buffer[:end], 10, 5, 6, F16) is None, end
    assert unpack(buffer, 10, 4, 6, F16) is None  # a fifth row where the end of the archive should be
    assert unpack(buffer, 11, 5, 6, F16) is None  # names of other rows
    assert unpack(buffer, 10, 5, 7, F16) is None and unpack(buffer, 10, 5, 6, np.dtype("float32")) is None


def npy_bytes(vector: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, vector)
    return stream.getvalue()


def test_tars_of_other_writers_go_to_the_member_reader():
    keys, sub, latents = sample_rows(6)
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(6):  # the same members, with pax records (a non-integer mtime)
            members = {"key.txt": keys[i].encode(), "latent.npy": npy_bytes(latents[i])}
            for field, data in {**members, "sub.cls": str(sub[i]).encode()}.items():
                info = tarfile.TarInfo(f"{i:012d}.{field}")
                info.size, info.mtime = len(data), 1.5
                tar.addfile(info, io.BytesIO(data))
    assert unpack(np.frombuffer(stream.getvalue(), np.uint8), 0, 6, 6, F16) is None


@pytest.mark.parametrize("keys", ["periodic", "an empty key", "a key over 512 bytes"])
def test_a_wds_store_reads_the_same_by_either_reader(tmp_path, keys):
    data = sample_rows(130)
    data = (data[0].astype("U600"), *data[1:])
    if keys != "periodic":
        data[0][70] = "" if keys == "an empty key" else "k" * 600  # the second of three tars is not periodic
    with create_store(tmp_path / "s", dim=6, dtype="float16", format="wds", tar_rows=50) as writer:
        writer.append(*data)
    store = open_store(tmp_path / "s")
    assert store.keys.tolist() == data[0].tolist() and np.array_equal(store.sub, data[1])
    assert store.latents().tobytes() == data[2].tobytes()
    assert store.take(np.array([129, 3, 75])).tobytes() == data[2][[129, 3, 75]].tobytes()
    blocks = list(store.blocks())
    assert np.concatenate([b[2] for b in blocks]).tobytes() == data[2].tobytes()
    assert all(b[2].flags.c_contiguous and b[2].flags.owndata for b in blocks)  # not views of a mapped file
    shard = tmp_path / "s" / "shard-000001.tar"
    assert (unpack(np.fromfile(shard, np.uint8), 50, 50, 6, F16) is None) == (keys != "periodic")
    found = [(s["__key__"], s["key.txt"].decode(), int(s["sub.cls"]))
             for s in webdataset.WebDataset(str(tmp_path / "s" / "shard-{000000..000002}.tar"), shardshuffle=False)]
    assert found == [(f"{i:012d}", str(data[0][i]), int(data[1][i])) for i in range(130)]


def test_tars_written_by_tarwriter_before_are_read_fast(tmp_path):
    data = sample_rows(20)
    tar = tmp_path / "shard-000000.tar"
    tar.write_bytes(tarwriter_bytes(0, *data))
    keys, sub, latents = unpack(np.fromfile(tar, np.uint8), 0, 20, 6, F16)
    assert keys.tolist() == data[0].tolist() and np.array_equal(sub, data[1]) and np.array_equal(latents, data[2])


def test_load_npy_reads_from_many_threads_at_once_and_never_unpickles():
    """Tars are read on a thread per core; each thread parses .npy headers (``load_npy``)."""
    from concurrent.futures import ThreadPoolExecutor

    from n2n.shards.tar_rows import load_npy

    members = []
    for dim in range(1, 65):
        stream = io.BytesIO()
        np.save(stream, np.arange(dim, dtype=np.float16))
        members.append(stream.getvalue())
    with ThreadPoolExecutor(8) as pool:
        vectors = list(pool.map(load_npy, members * 50))
    assert [len(v) for v in vectors] == list(range(1, 65)) * 50
    stream = io.BytesIO()
    np.save(stream, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npy(stream.getvalue())
