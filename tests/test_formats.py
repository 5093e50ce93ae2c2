"""Store formats as plug-ins: a format of a few lines registered in-process works everywhere n2n's own do,
and a broken, colliding or missing plug-in is refused in one line naming its distribution and entry point."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DIM, LAYOUT

from n2n import plugins
from n2n.plugins import IN_PROCESS, PluginError
from n2n.shards import (
    FORMATS,
    FormatError,
    Layout,
    StoreError,
    convert_store,
    create_store,
    open_store,
    resume_store,
    verify_store,
)
from n2n.shards.backend import missing_members
from n2n.shards.cli import main as shards_main


class NpyBackend:
    """A whole store format: one .npy file of (key, sub, latent) records per write, listed in meta.json."""

    state_keys = ("npy_files",)

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta

    @classmethod
    def create(cls, path: Path, meta: dict) -> None:
        meta["npy_files"] = []

    def check(self) -> None:
        files = self.meta["npy_files"]
        if sum(f["rows"] for f in files) != self.meta["count"] or not all((self.path / f["file"]).is_file()
                                                                          for f in files):
            raise StoreError(f"{self.path}: the npy files do not hold the committed rows")

    def truncate(self) -> None:
        listed = {f["file"] for f in self.meta["npy_files"]}
        for file in self.path.glob("rows-*.npy"):
            if file.name not in listed:
                file.unlink()

    def block_rows(self) -> int:
        return Layout.of(self.meta).unit_rows

    def write(self, keys: np.ndarray, sub: np.ndarray, latents: np.ndarray) -> None:
        width = max(1, *(len(k) for k in keys))
        records = np.empty(len(keys), [("key", f"U{width}"), ("sub", "i8"), ("latent", latents.dtype, (DIM,))])
        records["key"], records["sub"], records["latent"] = keys, sub, latents
        name = f"rows-{len(self.meta['npy_files']):06d}.npy"
        with open(self.path / f"{name}.tmp", "wb") as f:  # written aside, renamed whole: never half a file
            np.save(f, records)
        os.replace(self.path / f"{name}.tmp", self.path / name)
        self.meta["npy_files"].append({"file": name, "rows": len(keys)})

    def _records(self) -> Iterator[np.ndarray]:
        for f in self.meta["npy_files"]:
            yield np.load(self.path / f["file"], allow_pickle=False)

    def columns(self) -> tuple[np.ndarray, np.ndarray]:
        blocks = list(self.blocks())
        return (np.concatenate([np.empty(0, str), *(b[0] for b in blocks)]),
                np.concatenate([np.empty(0, np.int64), *(b[1] for b in blocks)]))

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for records in self._records():
            yield records["key"], records["sub"], records["latent"]

    def bounds(self) -> np.ndarray:
        return np.cumsum([0, *(f["rows"] for f in self.meta["npy_files"])])

    def read_latents(self, start: int, stop: int) -> np.ndarray:
        latents = [np.empty((0, self.meta["dim"]), self.meta["dtype"]), *(r["latent"] for r in self._records())]
        return np.concatenate(latents)[start:stop]


@pytest.fixture
def npy():
    """The format "npy", registered in this process for one test."""
    plugins.register_format("npy", NpyBackend)
    yield "npy"
    plugins.unregister("format", "npy")


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---------------------------------------------------------------- a plug-in format, end to end


def test_a_registered_format_writes_reads_verifies_and_resumes(tmp_path, npy, rows, assert_same_rows):
    data = rows(300)
    writer = create_store(tmp_path / "s", dim=DIM, format="npy", meta={"split": "train"}, **LAYOUT)
    writer.append(*(column[:100] for column in data))
    writer.flush()
    (tmp_path / "s" / "rows-000099.npy").write_bytes(b"a write never committed")
    del writer  # the process "dies"
    writer = resume_store(tmp_path / "s")
    assert writer.count == 100 and not (tmp_path / "s" / "rows-000099.npy").exists()
    writer.append(*(column[100:] for column in data))
    writer.close()
    store = open_store(tmp_path / "s")
    assert store.format == "npy" and store.meta["format_dist"] == IN_PROCESS and store.meta["split"] == "train"
    assert_same_rows(store, data)
    assert np.diff(store.bounds()).tolist() == [64, 36, 64, 64, 64, 8]  # a file per write: units of 64, flushes
    picked = np.array([299, 0, 150, 150, 7])
    assert store.take(picked).tobytes() == data[2][picked].tobytes()
    assert verify_store(tmp_path / "s") == []
    assert store.origin() == {"expert": None, "dataset": None, "split": "train"}  # npy_files is the format's


def test_a_registered_format_converts_to_and_from_zarr(tmp_path, npy, rows, assert_same_rows):
    data = rows(150, "float32")
    with create_store(tmp_path / "npy", dim=DIM, dtype="float32", format="npy", meta={"expert": "e"}) as writer:
        writer.append(*data)
    as_zarr = open_store(convert_store(tmp_path / "npy", tmp_path / "zarr", "zarr"))
    assert as_zarr.format == "zarr" and "npy_files" not in as_zarr.meta and as_zarr.meta["expert"] == "e"
    assert_same_rows(as_zarr, data)
    back = open_store(convert_store(tmp_path / "zarr", tmp_path / "back", "npy", unit_rows=40))
    assert back.format == "npy" and back.meta["format_dist"] == IN_PROCESS
    assert_same_rows(back, data)
    assert np.diff(back.bounds()).tolist() == [40, 40, 40, 30] and verify_store(back.path) == []


def test_n2n_shards_converts_to_a_registered_format_and_lists_it(tmp_path, npy, rows, assert_same_rows):
    with create_store(tmp_path / "shards" / "a", dim=DIM, format="h5") as writer:
        writer.append(*rows(20))
    result = CliRunner().invoke(shards_main, ["convert", str(tmp_path / "shards" / "a"), "--format", "npy"])
    assert result.exit_code == 0, result.output
    assert_same_rows(open_store(tmp_path / "shards" / "a-npy"), rows(20))
    listed = CliRunner().invoke(shards_main, ["ls", str(tmp_path / "shards")])
    assert listed.exit_code == 0 and re.search(r"a-npy\s.*npy\s.*20", listed.stdout), listed.stdout
    assert "npy (" in listed.stdout.split("format plug-ins:")[1]


# ---------------------------------------------------------------- formats by name, and the built-in ones


def test_the_built_in_formats_are_n2n_entry_points_that_implement_the_protocol():
    own = {name: claims[0] for name, claims in plugins.plugins("format").items() if claims[0].dist.startswith("n2n ")}
    assert set(own) == set(FORMATS)
    for plugin in own.values():
        assert missing_members(plugin.load()) == []


def test_an_unknown_format_is_refused_listing_the_installed_ones(tmp_path):
    with pytest.raises(StoreError) as err:
        create_store(tmp_path / "s", dim=DIM, format="parquet")
    assert one_line(err).startswith(f"{tmp_path / 's'}: unknown format 'parquet' (installed: h5, wds, zarr)")
    assert "n2n.formats entry point 'parquet'" in str(err.value) and not (tmp_path / "s").exists()


def test_a_store_whose_format_is_not_installed_says_what_to_install(tmp_path, npy, rows):
    path = tmp_path / "s"
    with create_store(path, dim=DIM, format="npy") as writer:
        writer.append(*rows(5))
    plugins.unregister("format", "npy")  # another process: the notebook that registered it is gone
    with pytest.raises(StoreError) as err:
        open_store(path)
    assert str(path / "meta.json") in one_line(err) and "unknown format 'npy'" in str(err.value)
    assert "n2n.register_format('npy', cls)" in str(err.value)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_dist": "n2n-npy 0.3"}))  # written by an installed one
    with pytest.raises(StoreError, match=r"install n2n-npy \(the store was written through its plug-in, n2n-npy 0.3\)"):
        open_store(path)
    assert len(verify_store(path)) == 1 and "install n2n-npy" in verify_store(path)[0]


# ---------------------------------------------------------------- broken and colliding plug-ins


class Half:
    """A would-be format that forgot most of the protocol."""

    state_keys = "npy_files"  # not a tuple

    def __init__(self, path: Path, meta: dict):
        self.path = path

    def create(self, path: Path, meta: dict) -> None:
        """Only this one."""


def test_an_in_process_class_that_is_no_backend_is_refused_in_one_line(tmp_path):
    plugins.register_format("half", Half)
    try:
        with pytest.raises(FormatError) as err:
            create_store(tmp_path / "s", dim=DIM, format="half")
    finally:
        plugins.unregister("format", "half")
    assert isinstance(err.value, StoreError) and isinstance(err.value, PluginError)
    assert one_line(err) == (
        "format plug-in 'half' from the entry point half = 'test_formats.Half' of (registered in this process) is "
        "not a store backend: it lacks block_rows, blocks, bounds, check, columns, read_latents, state_keys, "
        "truncate, write (the protocol n2n.shards.backend.Backend): fix the class given to n2n.register_format")
    assert not (tmp_path / "s").exists()


def test_a_name_taken_by_a_built_in_format_is_refused(npy):
    with pytest.raises(PluginError, match=r"format 'zarr' is already provided by the entry point zarr = "
                                          r"'n2n.shards.zarr_format:ZarrBackend' of n2n "):
        plugins.register_format("zarr", NpyBackend)
    with pytest.raises(PluginError, match=r"format 'npy' is already provided by .*\(registered in this process\)"):
        plugins.register_format("npy", NpyBackend)


@pytest.fixture
def installed(tmp_path, monkeypatch) -> Path:
    """A distribution "fakefmt 0.1" on sys.path, as pip would install it, declaring three formats: one whose
    class is no backend, one whose module attribute is missing, and one that claims n2n's "zarr"."""
    site = tmp_path / "site"
    (site / "fakefmt-0.1.dist-info").mkdir(parents=True)
    (site / "fakefmt-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakefmt\nVersion: 0.1\n")
    (site / "fakefmt-0.1.dist-info" / "entry_points.txt").write_text(
        "[n2n.formats]\nhalf = fakefmt_backend:Half\ngone = fakefmt_backend:Gone\nzarr = fakefmt_backend:Half\n")
    (site / "fakefmt_backend.py").write_text("class Half:\n    state_keys = ()\n\n    def check(self):\n        pass\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_an_installed_plug_in_that_is_no_backend_is_refused_naming_its_distribution(tmp_path, installed):
    with pytest.raises(FormatError) as err:
        create_store(tmp_path / "s", dim=DIM, format="half")
    assert one_line(err).startswith("format plug-in 'half' from the entry point half = 'fakefmt_backend:Half' of "
                                    "fakefmt 0.1 is not a store backend: it lacks block_rows, blocks, bounds, ")
    assert str(err.value).endswith(": fix or uninstall fakefmt")
    with pytest.raises(FormatError) as err:
        create_store(tmp_path / "s", dim=DIM, format="gone")
    assert one_line(err).startswith("format plug-in 'gone' failed to load (AttributeError: ")
    assert "from entry point gone = 'fakefmt_backend:Gone' of fakefmt 0.1" in str(err.value)
    assert not (tmp_path / "s").exists()


def test_two_distributions_claiming_one_format_are_refused_naming_both(tmp_path, installed):
    with pytest.raises(FormatError) as err:
        create_store(tmp_path / "s", dim=DIM, format="zarr")
    assert one_line(err).startswith("format 'zarr' is claimed twice: by the entry point zarr = ")
    assert "'n2n.shards.zarr_format:ZarrBackend' of n2n " in str(err.value) and "fakefmt 0.1" in str(err.value)
