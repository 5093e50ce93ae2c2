"""n2n-shards through click's test runner: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from n2n.shards import create_store, open_store
from n2n.shards.cli import main


@pytest.fixture
def root(tmp_path) -> Path:
    """shards/coco/{img,cap} (an image and a caption store) and the view shards/cap_img."""
    shards = tmp_path / "shards"
    for name, keys, sub in (("img", ["a", "b"], [0, 0]), ("cap", ["a", "b", "a"], [0, 0, 1])):
        meta = {"expert": {"spec": f"expert-{name}"}}
        with create_store(shards / "coco" / name, dim=4, format="h5", meta=meta) as writer:
            writer.append(keys, sub, np.ones((len(keys), 4)))
    (shards / "cap_img").mkdir()
    (shards / "cap_img" / "view.json").write_text(
        json.dumps({"n2n_view": 1, "source": "../coco/cap", "target": "../coco/img"})
    )
    return shards


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert all(fragment in result.stderr for fragment in fragments), result.stderr
    assert isinstance(result.exception, SystemExit)  # no traceback


def test_ls_lists_stores_and_views(root):
    result = run("ls", root)
    assert result.exit_code == 0, result.output
    for text in ("coco/img", "coco/cap", "expert-img", "cap_img", "coco/cap -> coco/img", "h5"):
        assert text in result.stdout


def test_ls_lists_the_installed_plug_ins_with_their_distributions(root):
    lines = run("ls", root).stdout.splitlines()
    listed = {line.split(" plug-ins: ")[0]: line.split(" plug-ins: ")[1] for line in lines if " plug-ins: " in line}
    assert listed.keys() == {"expert", "dataset", "format"}
    assert "h5 (n2n), wds (n2n), zarr (n2n)" in listed["format"]
    assert "minilm (n2n)" in listed["expert"] and "shapes (n2n)" in listed["dataset"]


def test_info_shows_store_meta_and_view_pairs(root):
    store = run("info", root / "coco" / "cap")
    assert store.exit_code == 0 and '"count": 3' in store.stdout and '"spec": "expert-cap"' in store.stdout
    view = run("info", root / "cap_img")
    assert view.exit_code == 0 and "pairs: 3" in view.stdout


def test_verify_exit_codes(root):
    good = run("verify", root / "coco" / "img")
    assert good.exit_code == 0 and good.stdout.strip() == "ok"
    assert run("verify", root / "cap_img").exit_code == 0
    with create_store(root / "bad", dim=2, meta=None) as writer:
        writer.append(["[b]a", "[b]a"], [0, 0], np.array([[np.nan, 0], [0, 0]]))
    bad = run("verify", root / "bad")
    assert bad.exit_code == 1 and "NaN" in bad.stdout and "duplicate" in bad.stdout
    assert "'[b]a'" in bad.stdout  # keys are printed as they are, never read as rich markup
    (root / "v2").mkdir()
    (root / "v2" / "view.json").write_text(
        json.dumps({"n2n_view": 1, "source": "../bad", "target": "../coco/img"})
    )
    assert run("verify", root / "v2").exit_code == 1


def test_pair_writes_a_view_and_counts_pairs(root):
    result = run("pair", root / "coco" / "img", root / "coco" / "cap", "--name", "img_cap", "--root", root)
    assert result.exit_code == 0, result.output
    assert "3 pairs" in result.stdout and (root / "img_cap" / "view.json").is_file()


def test_convert_defaults_to_path_dash_format(root):
    result = run("convert", root / "coco" / "cap", "--format", "zarr")
    assert result.exit_code == 0, result.output
    converted = open_store(root / "coco" / "cap-zarr")
    assert converted.format == "zarr" and converted.keys.tolist() == ["a", "b", "a"]
    explicit = run("convert", root / "coco" / "cap", "--format", "wds", "--out", root / "w")
    assert explicit.exit_code == 0 and open_store(root / "w").format == "wds"


def test_synth_passes_its_options_and_prints_the_view(root, monkeypatch):
    calls = []
    fake = types.ModuleType("n2n.shards.synthetic")
    fake.write_synthetic = lambda **kwargs: calls.append(kwargs) or Path(kwargs["root"]) / "synth-x"
    monkeypatch.setitem(sys.modules, "n2n.shards.synthetic", fake)
    result = run("synth", "--law", "bimodal", "--root", root, "--n", "50", "--format", "h5")
    assert result.exit_code == 0, result.output
    assert calls == [
        {"root": root, "law": "bimodal", "n": 50, "src_dim": 16, "dst_dim": 8, "seed": 0, "format": "h5"}
    ]
    assert str(root / "synth-x") in result.stdout


@pytest.mark.parametrize("command", ["ls", "info", "verify", "convert"])
def test_a_bad_path_is_a_one_line_error(tmp_path, command):
    extra = ["--format", "h5"] if command == "convert" else []
    assert_one_line_error(run(command, tmp_path / "nope", *extra), str(tmp_path / "nope"))


def test_store_errors_are_one_line(root):
    meta = json.loads((root / "coco" / "img" / "meta.json").read_text())
    (root / "coco" / "img" / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    cap, img = root / "coco" / "cap", root / "coco" / "img"
    assert_one_line_error(
        run("pair", cap, img, "--name", "x", "--root", root), str(img), "incomplete", "rerun"
    )
    assert_one_line_error(run("info", root / "cap_img"), str(img), "incomplete")
    assert_one_line_error(run("convert", cap, "--format", "h5", "--out", img), str(img), "already exists")
