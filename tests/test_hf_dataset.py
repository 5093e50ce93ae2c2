"""--data hf: Hugging Face datasets made here (save_to_disk, Parquet shards, an imagefolder with a metadata
file) extracted, paired, trained on and translated; columns guessed or named; bad columns refused naming the
ones there are; corrupt images listed; a kill -9 resumed to the bits of an uninterrupted run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import n2n
from n2n.extract.datasets import DatasetError, open_dataset
from n2n.extract.train_ae import ConvAutoencoder, save_autoencoder

datasets = pytest.importorskip("datasets")

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230), "yellow": (230, 220, 40)}
COMMON = {"num_workers": 0, "batch_size": 8, "progress": False}


def picture(colour: str, i: int, size: int = 32) -> Image.Image:
    image = Image.new("RGB", (size, size), (10, 10, 10))
    x = 4 + (i * 5) % 14
    ImageDraw.Draw(image).rectangle([x, x, x + 12, x + 12], fill=COLOURS[colour])
    return image


def columns(n: int) -> dict:
    names = [list(COLOURS)[i % len(COLOURS)] for i in range(n)]
    return {"id": [f"item-{i:03d}" for i in range(n)],
            "image": [picture(c, i) for i, c in enumerate(names)],
            "captions": [[f"a {c} square", f"a small {c} box"] for c in names]}


@pytest.fixture(scope="module")
def ae(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_autoencoder(ConvAutoencoder(image_size=32, channels=(4,), latent_dim=8),
                            tmp_path_factory.mktemp("hf-ae") / "ae")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A save_to_disk folder: an id column, an Image column, a list of captions per row."""
    folder = tmp_path_factory.mktemp("hf") / "saved"
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "captions": datasets.List(datasets.Value("string"))})
    datasets.Dataset.from_dict(columns(32), features=features).save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_goes_extract_pair_train_translate(saved, ae, tmp_path):
    data = open_dataset("hf", saved)
    assert (data.image_column, data.text_column, data.key_column) == ("image", "captions", "id")
    assert data.key(3) == "item-003" and data[3]["text"] == ["a yellow square", "a small yellow box"]
    text = n2n.extract("minilm", "hf", data_root=saved, out=tmp_path / "shards", **COMMON)
    image = n2n.extract(f"ae:{ae}", "hf", data_root=saved, out=tmp_path / "shards", **COMMON)
    assert len(text) == 64 and len(image) == 32 and set(image.keys.tolist()) == {f"item-{i:03d}" for i in range(32)}
    assert text.meta["dataset"]["columns"] == {"image": "image", "text": "captions", "key": "id"}
    assert "fingerprint" not in text.meta["dataset"]  # keyed by the id column, not by row number
    run = n2n.train(n2n.pair(text, image, name="hf_text_ae"), tmp_path / "run", steps=10, n_flows=2, hidden_dim=16,
                    batch_size=16, compile=False, progress=False, logger="none")
    images = n2n.Translator.load(run).translate(["a red square"], n=2)
    assert tuple(images.shape) == (1, 2, 3, 32, 32)


def test_parquet_shards_without_a_key_column_are_keyed_by_row_with_the_fingerprint(ae, tmp_path):
    table = columns(20)
    del table["id"]
    ds = datasets.Dataset.from_dict(table, features=datasets.Features({
        "image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))}))
    folder = tmp_path / "parquet"
    folder.mkdir()
    for i in range(2):
        ds.shard(2, i, contiguous=True).to_parquet(str(folder / f"part-{i}.parquet"))
    data = open_dataset("hf", folder)
    assert len(data) == 20 and data.key(11) == "000000011" and data.key_column is None
    store = n2n.extract(f"ae:{ae}", "hf", data_root=folder, out=tmp_path / "shards", **COMMON)
    assert store.complete and len(store) == 20 and store.meta["dataset"]["fingerprint"] == data.fingerprint
    assert n2n.extract(f"ae:{ae}", "hf", data_root=folder, out=tmp_path / "shards", **COMMON).path == store.path


def test_an_imagefolder_with_a_metadata_file(ae, tmp_path):
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    lines = ["file_name,text"]
    for i, colour in enumerate(["red", "green", "blue"] * 4):
        picture(colour, i).save(folder / f"{i:02d}.png")
        lines.append(f"{i:02d}.png,a {colour} square")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    data = open_dataset("hf", folder)
    assert (data.image_column, data.text_column) == ("image", "text")
    assert data[4]["text"] == ["a green square"] and data[4]["image"].size == (32, 32)
    image = n2n.extract(f"ae:{ae}", "hf", data_root=folder, out=tmp_path / "shards", **COMMON)
    text = n2n.extract("minilm", "hf", data_root=folder, out=tmp_path / "shards", **COMMON)
    assert len(image) == len(text) == 12 and set(image.keys.tolist()) == set(text.keys.tolist())
    run = n2n.train(n2n.pair(text, image, name="folder_text_ae"), tmp_path / "run", steps=5, n_flows=2, hidden_dim=16,
                    batch_size=8, holdout=0.0, compile=False, progress=False, logger="none")
    assert tuple(n2n.Translator.load(run).translate(["a blue square"], n=1).shape) == (1, 1, 3, 32, 32)


def test_columns_are_checked_naming_the_ones_there_are(saved, tmp_path):
    with pytest.raises(DatasetError, match=r"no column 'caption' \(text_column\); its columns: id, image, captions"):
        open_dataset("hf", saved, text_column="caption")
    two = tmp_path / "two-texts"
    datasets.Dataset.from_dict({"a": ["x", "y"], "b": ["z", "w"]}).save_to_disk(str(two))
    with pytest.raises(DatasetError, match=r"2 text columns \(a, b\): name one with --data-option text_column"):
        open_dataset("hf", two)
    assert open_dataset("hf", two, text_column="b")[1]["text"] == ["w"]
    assert open_dataset("hf", saved, key_column="").key(2) == "000000002"  # rows numbered on request
    with pytest.raises(DatasetError, match="nothing datasets can read at"):
        open_dataset("hf", tmp_path / "nowhere")
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b"]})}).save_to_disk(str(splits))
    with pytest.raises(DatasetError, match=r"no split 'validation'; its splits: train \(--split\)"):
        open_dataset("hf", splits, "validation")


def test_a_corrupt_image_is_listed_and_skipped(ae, tmp_path):
    good = io.BytesIO()
    picture("red", 0).save(good, format="PNG")
    ds = datasets.Dataset.from_dict(
        {"id": ["a", "b", "c"], "image": [{"bytes": good.getvalue(), "path": None},
                                          {"bytes": b"not an image", "path": None},
                                          {"bytes": good.getvalue(), "path": None}]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}))
    folder = tmp_path / "corrupt"
    ds.save_to_disk(str(folder))
    store = n2n.extract(f"ae:{ae}", "hf", data_root=folder, out=tmp_path / "shards", **COMMON)
    assert sorted(store.keys.tolist()) == ["a", "c"]
    errors = [json.loads(line) for line in (store.path / "errors.jsonl").read_text().splitlines()]
    assert [e["key"] for e in errors] == ["b"] and "unreadable image" in errors[0]["reason"]


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path, n2n_extract, same_store, killed_extraction):
    folder = tmp_path / "captions"
    datasets.Dataset.from_dict({"key": [f"k{i}" for i in range(240)],
                                "text": [f"caption number {i} of a coloured shape" for i in range(240)]}
                               ).save_to_disk(str(folder))
    args = ["--expert", "minilm", "--data", "hf", "--data-root", folder, "--batch-size", 8, "--num-workers", 0,
            "--dtype", "float32", "--commit-every", 0]
    assert n2n_extract(*args, "--out", tmp_path / "clean").exit_code == 0
    out = tmp_path / "crashed"
    killed_extraction(args, out, Path("hf") / "minilm", 60)
    result = n2n_extract(*args, "--out", out)
    assert result.exit_code == 0 and "resuming at item" in result.output, result.output
    same_store(tmp_path / "clean" / "hf" / "minilm", out / "hf" / "minilm")
    assert np.array_equal(n2n.open_store(out / "hf" / "minilm").keys, n2n.open_store(tmp_path / "clean" / "hf" /
                                                                                       "minilm").keys)


def test_a_label_column_is_what_the_label_expert_reads(tmp_path):
    """--data-option label_columns=NAME: a ClassLabel column as its names, a plain column as its values."""
    folder = tmp_path / "labelled"
    features = datasets.Features({"id": datasets.Value("string"), "caption": datasets.Value("string"),
                                  "kind": datasets.ClassLabel(names=["cat", "dog"]), "mood": datasets.Value("string")})
    datasets.Dataset.from_dict({"id": ["a", "b", "c"], "caption": ["x", "y", "z"], "kind": [1, 0, 1],
                                "mood": ["calm", "wild", "calm"]}, features=features).save_to_disk(str(folder))
    dataset = open_dataset("hf", folder, label_columns="kind,mood")
    assert dataset.attribute_values() == {"kind": ["cat", "dog"], "mood": ["calm", "wild"]}
    assert dataset[0]["attributes"] == {"kind": "dog", "mood": "calm"}
    store = n2n.extract("label@kind+mood", "hf", data_root=folder, data_options={"label_columns": "kind,mood"},
                        out=tmp_path / "shards", num_workers=0, progress=False)
    assert store.take(np.arange(3)).astype(np.float32).tolist() == [[0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0]]
    with pytest.raises(n2n.N2NError, match="no column 'colour' \\(label_columns\\); its columns: id, caption"):
        open_dataset("hf", folder, label_columns="colour")
