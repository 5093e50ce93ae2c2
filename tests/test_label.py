"""The label expert: what a person labelled (a dataset's attributes) as one-hot latents, its values recorded so a
run rebuilds it from its store; a translator conditioned on labels, and unpaired translation through one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import n2n
from n2n.extract.datasets import open_dataset
from n2n.extract.datasets.shapes_world import render
from n2n.extract.experts import ExpertError, load_expert
from n2n.extract.experts.ae import ConvAutoencoder, save_autoencoder


def test_label_codes_each_named_attribute_one_hot_in_the_datasets_order(tmp_path):
    store = n2n.extract("label@color+shape", "shapes", out=tmp_path, limit=30, num_workers=0, progress=False)
    assert store.dim == 8 + 5 and store.meta["expert"]["spec"] == "label@color+shape"
    shapes = open_dataset("shapes")
    codes = store.take(np.arange(30)).astype(np.float32)
    for i in range(30):
        attributes = shapes[i]["attributes"]
        assert codes[i].sum() == 2 and codes[i, shapes.attribute_values()["color"].index(attributes["color"])] == 1
        assert codes[i, 8 + shapes.attribute_values()["shape"].index(attributes["shape"])] == 1
    rebuilt = load_expert(store.meta["expert"]["spec"], options=store.meta["expert"]["options"])
    assert rebuilt.identity()["digest"] == store.meta["expert"]["digest"]  # the store alone rebuilds it


def test_a_label_the_dataset_does_not_have_is_one_line_listing_those_it_has(tmp_path, invoke):
    from n2n.extract.cli import main as n2n_extract

    result = invoke(n2n_extract, "--expert", "label@colour", "--data", "shapes", "--limit", 10, "--out", tmp_path)
    assert result.exit_code == 2 and "has no attribute 'colour'; its attributes: color, shape, size, position" \
        in result.output
    assert not any(tmp_path.rglob("*.json"))  # nothing left behind
    with pytest.raises(ExpertError, match="label needs the attributes"):
        load_expert("label")
    with pytest.raises(ExpertError, match="name each attribute once"):
        load_expert("label@shape+shape")


def test_folder_labels_its_class_folder(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        render({"color": "red", "shape": "circle", "size": "large", "position": "center"}, 32).save(
            tmp_path / "imgs" / cls / "a.png")
    dataset = open_dataset("folder", tmp_path / "imgs")
    assert dataset.attribute_values() == {"class": ["cats", "dogs"]}
    assert [dataset[i]["attributes"] for i in range(2)] == [{"class": "cats"}, {"class": "dogs"}]
    store = n2n.extract("label@class", "folder", data_root=tmp_path / "imgs", out=tmp_path / "shards",
                        num_workers=0, progress=False)
    assert store.take(np.arange(2)).astype(np.float32).tolist() == [[1, 0], [0, 1]]


def test_a_translator_conditioned_on_labels_edits_an_image_under_another_label(tmp_path):
    """Unpaired translation's path: label@shape -> autoencoder, then a picture's residual under another shape."""
    torch.manual_seed(0)
    ae = save_autoencoder(ConvAutoencoder(image_size=32, channels=(8,), latent_dim=8), tmp_path / "ae")
    common = {"out": tmp_path / "shards", "limit": 60, "num_workers": 0, "data_options": {"size": 32},
              "progress": False}
    labels, images = n2n.extract("label@shape", "shapes", **common), n2n.extract(f"ae:{ae}", "shapes", **common)
    run = n2n.train(n2n.pair(labels, images), tmp_path / "run", steps=20, n_flows=2, hidden_dim=16, compile=False,
                    progress=False, logger="none")
    translator = n2n.Translator.load(run)
    assert translator.source.spec == "label@shape" and translator.source.values["shape"][1] == "square"
    circle = render({"color": "red", "shape": "circle", "size": "large", "position": "center"}, 32)
    by_text = translator.edit([circle], ["circle"], ["square", "shape=star"])
    by_dict = translator.edit([circle], [{"shape": "circle"}], [{"shape": "square"}])
    assert by_text.shape == (1, 2, 3, 32, 32) and torch.allclose(by_text[:, :1], by_dict, atol=1e-5)
    with pytest.raises(n2n.N2NError, match="'hexagon'"):
        translator.edit([circle], ["circle"], ["hexagon"])
