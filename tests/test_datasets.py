"""Datasets: shapes, coco, folder and wds through their real code paths, on small data written here."""

from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import re
import subprocess
import sys
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from n2n import plugins
from n2n.extract.datasets import DatasetError, ItemError, known_datasets, open_dataset
from n2n.extract.datasets.shapes import (
    BACKGROUND,
    CAPTIONS_PER_ITEM,
    COLOR_WORDS,
    COLORS,
    GENERIC_NOUNS,
    POSITION_WORDS,
    POSITIONS,
    RGB,
    SHAPE_WORDS,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    render,
)

REPO = Path(__file__).resolve().parents[1]
N2N = f"n2n {version('n2n')}"  # the distribution that provides the built-in datasets, as stores record it

# ---------------------------------------------------------------- helpers


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int64)


def same_item(a: dict, b: dict) -> bool:
    """Items equal field by field, images compared by pixels."""
    if a.keys() != b.keys():
        return False
    return all(np.array_equal(pixels(a[k]), pixels(b[k])) if k == "image" else a[k] == b[k] for k in a)


SYNONYMS = {"color": COLOR_WORDS, "shape": SHAPE_WORDS, "size": SIZE_WORDS, "position": POSITION_WORDS}
PHRASES = sorted(((phrase, attribute, value) for attribute, table in SYNONYMS.items()
                  for value, phrases in table.items() for phrase in phrases), key=lambda p: -len(p[0]))
FILLER = {"a", "an", "there", "is", "picture", "of", "on", "dark", "background", ",", *GENERIC_NOUNS}


def parse(caption: str) -> dict[str, str]:
    """The attribute values a caption names, read with the synonym lists (longest phrase first, so
    "in the middle left" is not read as "in the middle"); fails on a word that is neither an
    attribute phrase nor template filler, or on two values of one attribute."""
    text, found = f" {caption} ", {}
    for phrase, attribute, value in PHRASES:
        pattern = rf"(?<![\w-]){re.escape(phrase)}(?![\w-])"
        if re.search(pattern, text):
            assert found.setdefault(attribute, value) == value, f"{caption!r} names two {attribute}s"
            text = re.sub(pattern, " ", text)
    leftover = set(text.replace(",", " , ").split()) - FILLER
    assert not leftover, f"{caption!r} has unparsed words {leftover}"
    return found


def first_batch_keys(batch: list[dict]) -> list[tuple]:
    """DataLoader collate for the worker test: what an item holds, comparable and picklable."""
    return [(item["key"], tuple(item.get("text", ())), item.get("label"), pixels(item["image"]).sum())
            for item in batch]


# ---------------------------------------------------------------- registry


def test_known_names_and_unknown_name_lists_them():
    assert known_datasets() == ["biggan", "coco", "folder", "hf", "shapes", "wds"]
    with pytest.raises(DatasetError) as err:
        open_dataset("imagenet")
    assert "imagenet" in str(err.value) and all(name in str(err.value) for name in known_datasets())


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(DatasetError, match="seed, size, count"):
        open_dataset("shapes", colour="red")


def test_item_error_survives_pickling_with_key_and_reason():
    err = pickle.loads(pickle.dumps(ItemError("k1", "broken")))
    assert (err.key, err.reason) == ("k1", "broken")


# ---------------------------------------------------------------- shapes


def test_shapes_items_are_deterministic_across_objects_and_processes():
    a, b = open_dataset("shapes"), open_dataset("shapes")
    for i in (0, 1, 777, 19999):
        assert same_item(a[i], b[i]) and a.attributes(i) == b.attributes(i)
    # Another process with another hash seed: nothing may depend on hash() or on global random state.
    code = "from n2n.extract.datasets import open_dataset; import json; d = open_dataset('shapes'); " \
           "print(json.dumps([d[5]['text'], d.attributes(5)]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout
    assert json.loads(out) == [a[5]["text"], json.loads(json.dumps(a.attributes(5)))]


def test_shapes_seed_and_split_change_items_and_keys():
    train, val, other = open_dataset("shapes"), open_dataset("shapes", split="val"), open_dataset("shapes", seed=1)
    assert (len(train), len(val)) == (20000, 2000)
    assert train.key(3) == "shapes-train-0000003" and val.key(3) == "shapes-val-0000003"
    for ds in (val, other):
        assert sum(ds.attributes(i) != train.attributes(i) for i in range(50)) > 40
    assert other.describe() == {"name": "shapes", "root": None, "split": "train", "count": 20000, "seed": 1,
                                "size": 64, "captions_per_item": CAPTIONS_PER_ITEM, "plugin": N2N}


def test_shapes_keys_unique_in_order_and_bounds_checked():
    ds = open_dataset("shapes", count=300)
    keys = [ds.key(i) for i in range(len(ds))]
    assert len(set(keys)) == 300 and keys == sorted(keys) and [ds[i]["key"] for i in range(3)] == keys[:3]
    assert ds.key(-1) == keys[-1]
    with pytest.raises(IndexError):
        ds[300]
    assert len(list(ds)) == 300  # iteration stops at the end, as for a sequence


def test_shapes_cover_every_attribute_value_and_label_is_the_shape():
    ds = open_dataset("shapes", split="val")
    attrs = [ds.attributes(i) for i in range(2000)]
    for name, values in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        counts = Counter(a[name] for a in attrs)
        assert set(counts) == set(values) and min(counts.values()) > 2000 / len(values) / 2, (name, counts)
    assert all(divmod(POSITIONS.index(a["position"]), 3) == (a["row"], a["col"]) for a in attrs)
    assert all(ds[i]["label"] == SHAPES.index(attrs[i]["shape"]) for i in range(100))


def test_shapes_captions_name_exactly_the_attributes_flagged():
    ds = open_dataset("shapes")
    named_flags = []
    for i in range(400):
        item, attrs = ds[i], ds.attributes(i)
        assert len(item["text"]) == CAPTIONS_PER_ITEM == len(attrs["captions"])
        for caption, flags in zip(item["text"], attrs["captions"], strict=True):
            assert parse(caption) == {a: attrs[a] for a, named in flags.items() if named}, caption
            named_flags.append(flags)
    omitting = sum(not all(f.values()) for f in named_flags) / len(named_flags)
    assert 0.22 < omitting < 0.38
    for attribute in ("color", "shape", "size", "position"):  # each attribute is left open sometimes
        assert any(not f[attribute] for f in named_flags)
    assert all(any(f.values()) for f in named_flags)  # no caption is empty of content


def test_shapes_pictures_show_the_attributes():
    ds = open_dataset("shapes", split="val")
    for i in range(300):
        attrs, img = ds.attributes(i), ds[i]["image"]
        assert img.mode == "RGB" and img.size == (64, 64)
        assert np.array_equal(pixels(img), pixels(render(attrs, 64)))  # ground truth can be redrawn
        rgb = pixels(img)
        mask = (rgb != BACKGROUND).any(axis=2)
        assert np.abs(rgb[mask].mean(axis=0) - RGB[attrs["color"]]).max() < 1
        ys, xs = np.nonzero(mask)
        assert (int(ys.mean() // (64 / 3)), int(xs.mean() // (64 / 3))) == (attrs["row"], attrs["col"])


def _mask(shape: str, size: str, position: str = "center", px: int = 64) -> np.ndarray:
    return (pixels(render({"color": "white", "shape": shape, "size": size, "position": position}, px))
            != BACKGROUND).any(axis=2)


def test_shapes_large_is_larger_and_shapes_differ_even_when_small():
    for shape in SHAPES:
        assert _mask(shape, "large").sum() > 1.8 * _mask(shape, "small").sum()
    for size in SIZES:
        for a in SHAPES:
            for b in SHAPES:
                if a < b:
                    ma, mb = _mask(a, size), _mask(b, size)
                    assert (ma ^ mb).sum() >= 0.15 * min(ma.sum(), mb.sum()), (a, b, size)


def test_shapes_options_checked():
    assert open_dataset("shapes", size=96, count=3)[0]["image"].size == (96, 96)
    assert open_dataset("shapes", size=64.0, count=3).size == 64  # a whole float is an integer
    with pytest.raises(DatasetError, match="splits train, val, test, not 'dev'"):
        open_dataset("shapes", split="dev")


# Values outside the range of every numeric option of every built-in dataset: (dataset, options, the rule).
BAD_OPTIONS = [
    ("shapes", {"seed": -1}, "seed = -1 must be an integer >= 0"),
    ("shapes", {"seed": 0.5}, "seed = 0.5 must be an integer >= 0"),
    ("shapes", {"size": 16}, "size = 16 must be an integer >= 32 and <= 1024"),
    ("shapes", {"size": 2048}, "size = 2048 must be an integer >= 32 and <= 1024"),
    ("shapes", {"size": "big"}, "size = 'big' must be an integer >= 32 and <= 1024"),
    ("shapes", {"count": 0}, "count = 0 must be an integer >= 1"),
    ("shapes", {"count": True}, "count = True must be an integer >= 1"),
    ("biggan", {"seed": -1}, "seed = -1 must be an integer >= 0"),
    ("biggan", {"count": 0}, "count = 0 must be an integer >= 1"),
    ("biggan", {"truncation": 0}, "truncation = 0 must be a number > 0 and <= 1"),
    ("biggan", {"truncation": 1.5}, "truncation = 1.5 must be a number > 0 and <= 1"),
    ("biggan", {"truncation": float("nan")}, "truncation = nan must be a number > 0 and <= 1"),
    ("biggan", {"classes": "1000"}, "classes = '1000' must be ImageNet class indices in 0..999"),
    ("biggan", {"classes": "cat"}, "classes = 'cat' must be ImageNet class indices in 0..999"),
    ("biggan", {"classes": -1}, "classes = -1 must be ImageNet class indices in 0..999"),
    ("biggan", {"model": "biggan-64"}, "model = 'biggan-64' must be one of biggan-deep-128"),
    ("coco", {"year": 2015}, "year = 2015 must be one of 2017, 2014"),
]


@pytest.mark.parametrize(("name", "options", "rule"), BAD_OPTIONS)
def test_dataset_options_are_range_checked_before_anything_is_read(name, options, rule, tmp_path):
    missing = tmp_path / "missing"  # coco would name the missing folder had it looked before checking
    with pytest.raises(DatasetError) as err:
        open_dataset(name, missing, **options)
    message = str(err.value)
    assert f"dataset {name}: option {rule}" in message and "--data-option" in message and "\n" not in message
    assert not missing.exists()


def test_every_numeric_dataset_option_has_a_row_in_the_table():
    covered = {(name, option) for name, options, _ in BAD_OPTIONS for option in options}
    for name in known_datasets():
        parameters = inspect.signature(plugins.find("dataset", name).load()).parameters.values()
        numeric = {(name, p.name) for p in parameters if re.search(r"\b(int|float)\b", str(p.annotation))}
        assert numeric <= covered, f"add rows to BAD_OPTIONS for {sorted(numeric - covered)}"


# ---------------------------------------------------------------- coco


def test_coco_items_keys_and_captions_in_annotation_order(tmp_path, write_coco):
    ds = open_dataset("coco", write_coco(tmp_path / "coco"))
    assert ds.modalities == ("image", "text") and len(ds) == 3
    assert [ds.key(i) for i in range(3)] == ["7", "19", "42"]
    item = ds[2]
    assert item["text"] == ["first caption of 42", "second caption of 42"]
    assert ds[0]["text"] == ["caption of 7"]
    red = {"color": "red", "shape": "square", "size": "large", "position": "center"}
    assert np.array_equal(pixels(item["image"]), pixels(render(red, 32)))
    assert same_item(ds[1], open_dataset("coco", tmp_path / "coco")[1]) and ds.attributes(1) is None
    assert ds.describe() == {"name": "coco", "root": str(tmp_path / "coco"), "split": "train", "count": 3,
                             "year": 2017, "plugin": N2N}


def test_coco_falls_back_to_2014_only_when_no_year_is_asked(tmp_path, write_coco):
    root = write_coco(tmp_path / "coco", year=2014, split="val")
    assert open_dataset("coco", root, split="val").year == 2014
    with pytest.raises(DatasetError, match="captions_val2017.json"):
        open_dataset("coco", root, split="val", year=2017)


def test_coco_missing_root_or_json_names_the_layout(tmp_path):
    with pytest.raises(DatasetError) as err:
        open_dataset("coco", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "annotations/captions_train2017.json" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty/annotations/captions_train2017.json.*train2017/"):
        open_dataset("coco", tmp_path / "empty")
    with pytest.raises(DatasetError, match="expected <root>/annotations"):
        open_dataset("coco")


def test_coco_corrupt_image_and_empty_caption_are_item_errors(tmp_path, png, write_coco):
    root = write_coco(tmp_path / "coco")
    (root / "train2017" / f"{7:012d}.png").write_bytes(b"not a png at all")
    (root / "train2017" / f"{19:012d}.png").write_bytes(png()[:60])  # truncated
    data = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    data["annotations"][0]["caption"] = "   "
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(data))
    ds = open_dataset("coco", root)
    for index, key, reason in ((0, "7", "unreadable image"), (1, "19", "unreadable image"), (2, "42", "empty caption")):
        with pytest.raises(ItemError) as err:
            ds[index]
        assert err.value.key == key and reason in err.value.reason
    assert "000000000007.png" in pytest.raises(ItemError, ds.__getitem__, 0).value.reason
    # A text expert does not decode images: the corrupt ones are no error for it.
    assert ds.with_modalities(["text"])[0] == {"key": "7", "text": ["caption of 7"]}
    with pytest.raises(DatasetError, match="label"):
        ds.with_modalities(["label"])


# ---------------------------------------------------------------- folder


@pytest.fixture
def write_folder(png):
    """``write_folder(root)``: an ImageNet-layout folder, two classes of pictures and an empty one."""

    def write(root: Path) -> Path:
        # n00 is empty: it still takes label 0, as a partial copy of ImageNet must keep the usual labels.
        for cls, names in (("n02", ["b.png", "a.JPG"]), ("n01", ["img_001.png", "notes.txt"]), ("n00", [])):
            (root / cls).mkdir(parents=True)
            for n in names:
                color = {"n01": "red", "n02": "green"}[cls]
                attrs = {"color": color, "shape": "circle", "size": "large", "position": "center"}
                (root / cls / n).write_bytes(png(attrs) if not n.endswith(".txt") else b"not an image")
                if n.endswith(".JPG"):  # a real JPEG under an upper-case extension
                    render(attrs, 32).save(root / cls / n, format="JPEG")
        return root

    return write


def test_folder_labels_in_sorted_class_order_and_keys_without_extension(tmp_path, write_folder):
    ds = open_dataset("folder", write_folder(tmp_path / "imgs"))
    assert ds.modalities == ("image", "label", "attributes") and ds.classes == ["n00", "n01", "n02"]
    assert [ds.key(i) for i in range(len(ds))] == ["n01/img_001", "n02/a", "n02/b"]
    assert [ds[i]["label"] for i in range(3)] == [1, 2, 2]
    assert np.abs(pixels(ds[1]["image"])[16, 16] - RGB["green"]).max() < 30  # the JPEG decodes
    assert same_item(ds[2], open_dataset("folder", tmp_path / "imgs")[2])


def test_folder_uses_the_split_folder_and_refuses_a_missing_split(tmp_path, write_folder):
    write_folder(tmp_path / "root" / "val")
    ds = open_dataset("folder", tmp_path / "root", split="val")
    assert ds.key(0) == "n01/img_001" and ds.base == tmp_path / "root" / "val"
    with pytest.raises(DatasetError, match="split folders val but no train/"):
        open_dataset("folder", tmp_path / "root")


def test_folder_missing_or_empty_names_the_layout(tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(DatasetError, match=r"expected .*/<split>/<class>/<image>"):
            open_dataset("folder", root)
    (tmp_path / "cls").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        open_dataset("folder", tmp_path)


def test_folder_corrupt_image_is_an_item_error(tmp_path, write_folder):
    root = write_folder(tmp_path / "imgs")
    (root / "n02" / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ItemError) as err:
        open_dataset("folder", root)[2]
    assert err.value.key == "n02/b" and "b.png" in err.value.reason


# ---------------------------------------------------------------- wds


@pytest.fixture
def write_wds(png, write_tar):
    """``write_wds(folder)``: two caption shards: one by webdataset's TarWriter, one by tarfile; returns their
    brace pattern.

    File names with dots are encoded as webdataset needs: the dots live in a directory ("2024.v1/")
    or are replaced ("photo_001" for photo.001); a json caption list; a metadata member to skip.
    """

    def write(folder: Path) -> str:
        folder.mkdir()
        with webdataset.TarWriter(str(folder / "shard-000.tar")) as writer:
            writer.write({"__key__": "2024.v1/photo_001", "jpg": png({"color": "red", "shape": "star", "size": "large",
                                                                       "position": "center"}), "txt": "a red star"})
            writer.write({"__key__": "2024.v1/photo_002", "png": png(),
                          "json": json.dumps({"caption": "a red circle"})})
        write_tar(folder / "shard-001.tar", [
            ("__index__", b"metadata"),
            ("s3.webp", _webp()), ("s3.json", json.dumps({"captions": ["one", "two"], "width": 32}).encode()),
            ("s4.png", png()), ("s4.txt", b"a circle"),
        ])
        return str(folder / "shard-{000..001}.tar")

    return write


def _webp() -> bytes:
    buffer = io.BytesIO()
    render({"color": "blue", "shape": "cross", "size": "small", "position": "top-left"}, 32).save(buffer, "WEBP",
                                                                                                 lossless=True)
    return buffer.getvalue()


def test_wds_keys_and_order_match_webdataset_itself(tmp_path, write_wds):
    pattern = write_wds(tmp_path / "wds")
    ds = open_dataset("wds", pattern)
    theirs = [s["__key__"] for s in webdataset.WebDataset(pattern, shardshuffle=False)]
    assert [ds.key(i) for i in range(len(ds))] == theirs == ["2024.v1/photo_001", "2024.v1/photo_002", "s3", "s4"]
    assert ds.modalities == ("image", "text")
    assert ds[0]["text"] == ["a red star"] and ds[1]["text"] == ["a red circle"] and ds[2]["text"] == ["one", "two"]
    star = {"color": "red", "shape": "star", "size": "large", "position": "center"}
    assert np.array_equal(pixels(ds[0]["image"]), pixels(render(star, 32)))
    assert ds[2]["image"].size == (32, 32)
    assert same_item(ds[3], open_dataset("wds", pattern)[3])
    assert open_dataset("wds", tmp_path / "wds").describe()["shards"] == 2  # a folder of tars works too


def test_wds_grouping_of_dotted_names_and_duplicate_keys(tmp_path, png, write_tar):
    # An unencoded dotted name is grouped as webdataset groups it: key "photo", field "001.jpg" (an image).
    tar = write_tar(tmp_path / "dots.tar", [("photo.001.jpg", png()), ("photo.txt", b"a photo")])
    ds = open_dataset("wds", tar)
    assert [s["__key__"] for s in webdataset.WebDataset(str(tar), shardshuffle=False)] == ["photo"] == [ds.key(0)]
    assert ds[0]["text"] == ["a photo"]
    write_tar(tmp_path / "split.tar", [("a.png", png()), ("b.png", png()), ("a.txt", b"far from its image")])
    with pytest.raises(DatasetError, match="key a appears twice"):
        open_dataset("wds", tmp_path / "split.tar")


def test_wds_labels_and_metadata_json_is_not_text(tmp_path, png, write_tar):
    tar = write_tar(tmp_path / "cls.tar", [("x1.jpg", png()), ("x1.cls", b"3\n"), ("x1.json", b'{"width": 32}'),
                                           ("x2.jpg", png()), ("x2.cls", b"seven")])
    ds = open_dataset("wds", tar)
    assert ds.modalities == ("image", "label") and ds[0]["label"] == 3
    with pytest.raises(ItemError, match="not an integer"):
        ds[1]


def test_wds_bad_items_are_item_errors(tmp_path, png, write_tar):
    tar = write_tar(tmp_path / "bad.tar", [("k1.jpg", b"\xff\xd8 not a jpeg"), ("k1.txt", b"fine"),
                                           ("k2.png", png()), ("k2.txt", b"  \n"),
                                           ("k3.txt", b"no image here")])
    ds = open_dataset("wds", tar)
    for index, key, reason in ((0, "k1", "unreadable image"), (1, "k2", "empty caption"), (2, "k3", "no image")):
        with pytest.raises(ItemError) as err:
            ds[index]
        assert (err.value.key, reason in err.value.reason) == (key, True)


def test_wds_refuses_unsafe_truncated_and_missing_shards(tmp_path, png, write_tar):
    for name in ("../evil.txt", "/abs/evil.txt"):
        tar = write_tar(tmp_path / "unsafe.tar", [("ok.png", png()), (name, b"x")])
        with pytest.raises(DatasetError, match="outside the archive"):
            open_dataset("wds", tar)
    full = write_tar(tmp_path / "full.tar", [(f"k{i}.png", png()) for i in range(4)]).read_bytes()
    for cut in (1500, 1024, 1600, 4096):  # in a header, at a member boundary, in data, before the end marker
        (tmp_path / "cut.tar").write_bytes(full[:cut])
        with pytest.raises(DatasetError, match="truncated"):
            open_dataset("wds", tmp_path / "cut.tar")
    with pytest.raises(DatasetError, match=r"shard-\{000\.\.009\}\.tar"):
        open_dataset("wds", tmp_path / "missing-000.tar")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetError, match="no .tar files"):
        open_dataset("wds", tmp_path / "empty_dir")


# ---------------------------------------------------------------- workers


def test_datasets_pickle_and_read_the_same_in_loader_workers(tmp_path, write_coco, write_folder, write_wds):
    datasets = [
        open_dataset("shapes", count=8),
        open_dataset("coco", write_coco(tmp_path / "coco")),
        open_dataset("folder", write_folder(tmp_path / "imgs")),
        open_dataset("wds", write_wds(tmp_path / "wds")),
    ]
    for ds in datasets:
        expected = [ds[i] for i in range(len(ds))]  # opens the wds handles in this process first
        copy = pickle.loads(pickle.dumps(ds))
        assert all(same_item(a, copy[i]) for i, a in enumerate(expected))
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=first_batch_keys,
                                             multiprocessing_context="fork")
        assert [row for batch in loader for row in batch] == first_batch_keys(expected)
