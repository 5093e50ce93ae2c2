"""The sdvae expert (diffusers' AutoencoderKL): load, encode, decode and every error, on a random tiny VAE.

The tiny VAE (conftest.save_tiny_sdvae) has two encoder blocks, so its downsampling factor is 2
(Stable Diffusion's is 8): at size 32 its latent is 4 x 16 x 16 = 1024 dims.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import numpy as np
import pytest
import torch
from conftest import save_tiny_bert, save_tiny_sdvae  # noqa: E402
from PIL import Image

import n2n
from n2n.extract.experts import ExpertError, load_expert
from n2n.extract.experts.sdvae import SDVAEExpert, load


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return save_tiny_sdvae(tmp_path_factory.mktemp("sdvae") / "tiny-vae", seed=0)


@pytest.fixture(scope="module")
def vae(vae_dir) -> SDVAEExpert:
    return load(str(vae_dir), None, None, size=32)


def picture(size=(48, 40), seed=0) -> Image.Image:
    """A non-square random RGB picture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encode(expert, images) -> torch.Tensor:
    return expert.encode(expert.collate([row for image in images for row in expert.rows({"image": image})]))["latent"]


def one_line_error(call, match: str) -> str:
    with pytest.raises(ExpertError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_spec_name_and_dims_follow_the_size(vae, vae_dir):
    assert (vae.spec, vae.name, vae.modality, vae.can_decode) == (
        f"sdvae:{vae_dir}@latent", "sdvae-tiny-vae-32px", "image", True)
    assert vae.layers == ("latent",) and vae.dims == {"latent": 4 * 16 * 16}
    assert vae.weights == str(vae_dir)
    bigger = load(str(vae_dir), "latent", None, size=64)
    assert bigger.name == "sdvae-tiny-vae-64px" and bigger.dims == {"latent": 4 * 32 * 32}
    assert bigger.identity()["digest"] == vae.identity()["digest"]
    assert vae.preprocess() == {"image_size": 32, "resize": "shorter side, bicubic, antialias", "crop": "center",
                                "range": [-1, 1], "latent": "posterior mean", "scaling_factor": 0.18215,
                                "shift_factor": 0.0, "latent_shape": [4, 16, 16]}
    assert bigger.preprocess()["latent_shape"] == [4, 32, 32]
    default = load_expert(f"sdvae:{vae_dir}")  # no options: 256 px
    assert default.name == "sdvae-tiny-vae-256px" and default.dims == {"latent": 4 * 128 * 128}
    with pytest.raises(ExpertError, match="has no layer 'mean'"):
        load(str(vae_dir), "mean", None, size=32)


def test_latent_is_the_scaled_posterior_mean(vae):
    row = vae.rows({"image": Image.new("RGB", (60, 40), (255, 0, 51))})[0]  # a flat colour: known pixels
    assert row.shape == (3, 32, 32)
    expected = torch.tensor([1.0, -1.0, 51 / 255 * 2 - 1]).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(row, expected)
    images = [picture(), picture((30, 50), seed=1)]
    batch = vae.collate([vae.rows({"image": image})[0] for image in images])
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    latent = vae.encode(batch)["latent"]
    with torch.inference_mode():
        mean = vae.network.encode(batch["image"]).latent_dist.mean
    assert latent.dtype == torch.float32 and latent.shape == (2, 1024)
    torch.testing.assert_close(latent, (mean * 0.18215).flatten(1))
    assert torch.equal(encode(vae, images), latent)  # deterministic: the mean, never a sample


def test_encode_decode_round_trip(vae):
    latent = encode(vae, [picture(), picture(seed=2), Image.new("L", (32, 32), 128)])  # greyscale: made RGB
    images = vae.decode(latent)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(vae.decode(latent), images)
    assert vae.decode(latent.double()[:1]).shape == (1, 3, 32, 32)


def test_a_latent_does_not_depend_on_its_batch(vae):
    images = [picture(seed=seed) for seed in range(4)]
    together = encode(vae, images)
    alone = torch.cat([encode(vae, [image]) for image in images])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_shift_factor_is_applied_both_ways(vae, tmp_path):
    shifted = load(str(save_tiny_sdvae(tmp_path / "shifted", seed=0, shift_factor=0.5)), None, None, size=32)
    assert shifted.identity()["digest"] == vae.identity()["digest"]  # same weights, another config
    assert shifted.preprocess()["shift_factor"] == 0.5
    images = [picture(), picture(seed=3)]
    latent = encode(shifted, images)
    torch.testing.assert_close(latent, encode(vae, images) - 0.5 * 0.18215)
    torch.testing.assert_close(shifted.decode(latent), vae.decode(encode(vae, images)), atol=1e-5, rtol=1e-4)


def test_a_pipeline_folder_uses_its_vae(vae, vae_dir, tmp_path):
    import shutil

    pipeline = tmp_path / "sd-pipeline"
    shutil.copytree(vae_dir, pipeline / "vae")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    expert = load(None, None, str(pipeline), size=32)  # --weights PATH, the default model's name
    assert expert.name == "sdvae-sd-vae-ft-mse-32px" and expert.weights == str(pipeline / "vae")
    assert expert.identity()["digest"] == vae.identity()["digest"]
    assert torch.equal(encode(expert, [picture()]), encode(vae, [picture()]))


@pytest.mark.parametrize("size", [0, 1, 33, -4, 32.0, True, "32"])
def test_bad_sizes(vae_dir, size):
    one_line_error(lambda: load(str(vae_dir), None, None, size=size),
                   f"sdvae: --expert-option size={size} must be a positive multiple of 2 \\(the VAE's downsampling\\)")


def test_wrong_model_type_folders(tmp_path):
    bert = save_tiny_bert(tmp_path / "bert", seed=0)
    one_line_error(lambda: load(str(bert), None, None, size=32),
                   "holds a bert model, not an AutoencoderKL; pass the folder of a diffusers AutoencoderKL "
                   r"\(e.g. the vae/ subfolder")
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    one_line_error(lambda: load(None, None, str(unet), size=32), "holds a UNet2DConditionModel model")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: load(str(tmp_path / "empty"), None, None), "has no config.json")
    one_line_error(lambda: load(str(tmp_path / "nowhere" / "vae"), None, None), "no such folder")


def test_missing_or_partial_weights_are_errors(vae_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((vae_dir / "config.json").read_text())
    one_line_error(lambda: load(str(bare), None, None, size=32), "has a config.json but no weights")
    (bare / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    one_line_error(lambda: load(str(bare), None, None, size=32), "sdvae: cannot load .*Unable to load weights")
    weights = load_file(vae_dir / "diffusion_pytorch_model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("decoder.up_blocks")},
              str(bare / "diffusion_pytorch_model.safetensors"))
    one_line_error(lambda: load(str(bare), None, None, size=32), r"parameters of the AutoencoderKL unset \(decoder")


def test_missing_diffusers(vae_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    message = one_line_error(lambda: load(str(vae_dir), None, None, size=32), "sdvae needs diffusers")
    assert message == "sdvae needs diffusers: pip install 'n2n[diffusers]'"


def test_missing_hub_weights_offline(offline):
    one_line_error(lambda: load_expert("sdvae"), "sdvae: no weights for 'stabilityai/sd-vae-ft-mse'.*--weights PATH")
    one_line_error(lambda: load("someone/some-vae", None, None, size=64), "no weights for 'someone/some-vae'")


def test_options_through_load_expert(vae_dir):
    expert = load_expert(f"sdvae:{vae_dir}", options={"size": 32})
    assert expert.dims == {"latent": 1024} and expert.options == {"size": 32} and expert.name.endswith("-32px")
    one_line_error(lambda: load_expert(f"sdvae:{vae_dir}", options={"size": 5}), "size=5 must be a positive multiple")
    one_line_error(lambda: load_expert(f"sdvae:{vae_dir}", options={"sise": 32}), "has no option sise.*takes size")


def test_extract_and_decode_end_to_end(vae, vae_dir, tmp_path):
    store = n2n.extract(f"sdvae:{vae_dir}", "shapes", out=tmp_path / "shards", limit=64, batch_size=32,
                        num_workers=0, data_options={"size": 32}, expert_options={"size": 32}, progress=False)
    assert store.path.name == "sdvae-tiny-vae-32px" and store.complete
    assert len(store) == 64 and store.dim == 1024
    assert store.meta["expert"]["options"] == {"size": 32}
    assert store.meta["expert"]["preprocess"]["latent_shape"] == [4, 16, 16]
    images = vae.decode(torch.from_numpy(store.latents()[:4].astype(np.float32)))
    assert images.shape == (4, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
