"""The clip expert family on a random-weight tiny CLIP (conftest.save_tiny_clip): both towers' specs, layers,
identities and latents checked against transformers' own CLIPModel, its errors, and one tiny
extract -> pair -> train run through the public API."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import pytest
import torch
from conftest import save_tiny_bert, save_tiny_clip  # noqa: E402
from PIL import Image

from n2n.extract.experts import ExpertError, load_expert

CAPTIONS = ["a red circle", "a crimson circle", "",
            "a very large green triangle in the upper left corner of a dark and otherwise empty picture of shapes"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="module")
def text(clip_dir):
    return load_expert(f"clip:{clip_dir}")


@pytest.fixture(scope="module")
def image(clip_dir):
    return load_expert(f"clip:{clip_dir}@image")


@pytest.fixture(scope="module")
def reference(clip_dir):
    """transformers' own CLIPModel of the same folder, to check the latents against."""
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(clip_dir).eval()


def features(out: torch.Tensor | object) -> torch.Tensor:
    """get_text/image_features' result: a tensor in transformers 4, an output whose pooler_output is projected in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def pictures() -> list[Image.Image]:
    """Images of different sizes and modes (RGB, greyscale, RGBA, palette)."""
    torch.manual_seed(1)
    noise = (torch.rand(40, 50, 3) * 255).byte().numpy()
    return [Image.fromarray(noise), Image.fromarray(noise).convert("L").resize((20, 70)),
            Image.fromarray(noise).convert("RGBA").resize((32, 32)), Image.fromarray(noise).convert("P").resize((9, 9))]


def test_clip_specs_layers_and_names(clip_dir, text, image):
    name = clip_dir.name
    assert (text.spec, text.name, text.modality, text.can_decode) == (f"clip:{clip_dir}@text", f"clip-{name}-text",
                                                                       "text", False)
    assert (text.layers, text.dims, text.spec_layer) == (("text", "text-pooled"), {"text": 16, "text-pooled": 32}, None)
    assert (image.spec, image.name, image.modality) == (f"clip:{clip_dir}@image", f"clip-{name}-image", "image")
    assert (image.layers, image.dims) == (("image", "image-pooled"), {"image": 16, "image-pooled": 32})
    pooled = load_expert(f"clip:{clip_dir}@text-pooled")
    assert (pooled.spec, pooled.name, pooled.layers, pooled.spec_layer) == (
        f"clip:{clip_dir}@text-pooled", f"clip-{name}-text", ("text-pooled", "text"), "text-pooled")
    assert load_expert(f"clip:{clip_dir}@image-pooled").layers == ("image-pooled", "image")
    weights = load_expert("clip@image", weights=clip_dir)  # --weights replaces the default hub model
    assert (weights.spec, weights.name, weights.weights) == ("clip:openai/clip-vit-base-patch32@image",
                                                             "clip-clip-vit-base-patch32-image", str(clip_dir))


def test_clip_identities(clip_dir, text, image, tmp_path):
    t, i = text.identity(), image.identity()
    assert (t["spec"], i["spec"], t["weights"], i["weights"]) == (text.spec, image.spec, str(clip_dir), str(clip_dir))
    assert len(t["digest"]) == len(i["digest"]) == 16 and t["digest"] != i["digest"]  # each is its tower's weights
    assert t["preprocess"]["layers"] == {
        "text": "projected text embedding (text_projection of the EOS token's state), L2-normalised",
        "text-pooled": "text model's pooled output (the EOS token's final state) before the projection"}
    assert set(i["preprocess"]["layers"]) == {"image", "image-pooled"}
    assert t["preprocess"]["tokenizer"] == "CLIPTokenizer" and t["preprocess"]["max_length"] == 77
    assert {k: i["preprocess"][k] for k in ("size", "crop_size", "resample")} == {
        "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": "bicubic"}
    assert len(i["preprocess"]["image_mean"]) == len(i["preprocess"]["image_std"]) == 3
    assert load_expert(f"clip:{clip_dir}@text-pooled").identity()["preprocess"] == t["preprocess"]
    assert load_expert(f"clip:{clip_dir}").identity()["digest"] == t["digest"]
    other = load_expert(f"clip:{save_tiny_clip(tmp_path / 'other', seed=1)}").identity()
    assert other["digest"] != t["digest"] and other["preprocess"] == t["preprocess"]


def test_clip_text_latents(text, reference):
    batch = text.collate(text.rows({"text": CAPTIONS}))
    assert batch["input_ids"].shape == (4, 77)  # the long caption is cut to the 77 positions, its EOS kept
    assert batch["input_ids"][3, -1] == text.tokenizer.eos_token_id
    out = text.encode(batch, text.layers)
    assert torch.equal(out["text"], text.encode(batch, text.layers)["text"])  # deterministic
    assert torch.allclose(out["text"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(out["text-pooled"].norm(dim=-1), torch.ones(4), atol=1e-2)
    with torch.no_grad():
        projected = features(reference.get_text_features(**batch))
    assert torch.allclose(out["text"], torch.nn.functional.normalize(projected, dim=-1), atol=1e-5)
    assert torch.allclose(out["text-pooled"], reference.text_model(**batch).pooler_output, atol=1e-5)
    for n, caption in enumerate(CAPTIONS):  # alone, as in a batch with longer captions
        alone = text.encode(text.collate(text.rows({"text": caption})), text.layers)
        assert torch.allclose(alone["text"], out["text"][n:n + 1], atol=1e-5)
        assert torch.allclose(alone["text-pooled"], out["text-pooled"][n:n + 1], atol=1e-5)


def test_clip_image_latents(image, reference):
    rows = [row for picture in pictures() for row in image.rows({"image": picture})]
    batch = image.collate(rows)
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    out = image.encode(batch, image.layers)
    assert torch.equal(out["image"], image.encode(image.collate(rows), image.layers)["image"])
    assert torch.allclose(out["image"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(out["image-pooled"].norm(dim=-1), torch.ones(4), atol=1e-2)
    with torch.no_grad():
        projected = features(reference.get_image_features(pixel_values=batch["pixel_values"]))
    assert torch.allclose(out["image"], torch.nn.functional.normalize(projected, dim=-1), atol=1e-5)
    alone = image.encode(image.collate(rows[1:2]), ["image-pooled"])["image-pooled"]
    assert torch.allclose(alone, out["image-pooled"][1:2], atol=1e-5)


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_clip_errors(clip_dir, tmp_path, offline):
    with pytest.raises(ExpertError) as err:
        load_expert(f"clip:{clip_dir}@vision")
    assert "no layer 'vision'; its layers: text, text-pooled, image, image-pooled" in one_line(err)
    bert = save_tiny_bert(tmp_path / "bert", seed=0)
    for spec, weights in ((f"clip:{bert}", None), ("clip", bert)):
        with pytest.raises(ExpertError) as err:
            load_expert(spec, weights=weights)
        assert one_line(err) == (f"clip: {bert} holds a 'bert' model, not CLIP; "
                                 "pass a CLIP folder (save_pretrained of CLIPModel)")
    with pytest.raises(ExpertError, match="no weights for 'openai/clip-vit-base-patch32'.*--weights PATH") as err:
        load_expert("clip@image")
    one_line(err)
    from safetensors.torch import load_file, save_file

    partial = save_tiny_clip(tmp_path / "partial", seed=0)
    state = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("text_projection")}, partial / "model.safetensors")
    with pytest.raises(ExpertError, match="lacks 1 weights of the text tower .*text_projection.weight") as err:
        load_expert(f"clip:{partial}@text-pooled")
    one_line(err)
    assert load_expert(f"clip:{partial}@image").dims["image"] == 16  # the image tower is whole
    bare = save_tiny_clip(tmp_path / "bare", seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (bare / name).unlink()
    for spec, what in ((f"clip:{bare}", "tokenizer"), (f"clip:{bare}@image", "image processor")):
        with pytest.raises(ExpertError, match=f"clip: no {what} in {bare}: .*; expected a CLIPModel") as err:
            load_expert(spec)
        one_line(err)


def test_clip_extract_pair_train(clip_dir, tmp_path):
    import n2n

    common = {"out": tmp_path / "shards", "limit": 64, "batch_size": 32, "num_workers": 0,
              "data_options": {"size": 32}, "progress": False}
    texts = n2n.extract(f"clip:{clip_dir}@text", "shapes", **common)
    images = n2n.extract(f"clip:{clip_dir}@image", "shapes", **common)
    assert texts.path.name == f"clip-{clip_dir.name}-text" and images.path.name == f"clip-{clip_dir.name}-image"
    assert (len(texts), texts.dim, len(images), images.dim) == (64 * 5, 16, 64, 16)  # shapes: 5 captions an item
    assert texts.identity()["expert"]["preprocess"]["layers"]["text"].endswith("L2-normalised")
    view = n2n.pair(texts, images)
    run = n2n.train(view, tmp_path / "run", steps=30, n_flows=2, hidden_dim=16, compile=False, progress=False)
    assert (run / "checkpoint.safetensors").is_file()
