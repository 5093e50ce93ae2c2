"""Random-weight model folders in the layout the hub serves, for timing and tests offline.

Timing needs no trained weights, only the real architecture: ``save_clip``, ``save_sdvae`` and
``save_bert`` write a CLIP, a Stable Diffusion VAE and a BERT at their published sizes by default
(ViT-B/32 CLIP, SD's 4-block VAE, bert-base), and at test size on request (the tests' tiny ones).
All are loaded by n2n exactly as a downloaded checkpoint is: ``clip:<folder>``, ``sdvae:<folder>``,
``bert:<folder>``. None needs a file from the hub: the GPU machines have no network.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from pathlib import Path

import torch

# Stable Diffusion 1.x's VAE (stabilityai/sd-vae-ft-mse's config.json).
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
          "norm_num_groups": 32, "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": 256, "scaling_factor": 0.18215}

# Test size: what tests/conftest.py builds, and bench.extraction --tiny.
_TOWER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37}
TINY_CLIP = {"text": _TOWER, "vision": {**_TOWER, "image_size": 32, "patch_size": 8}, "projection_dim": 16}
TINY_SDVAE = {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 8,
              "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
              "sample_size": 32}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def clip_tokenizer():
    """A byte-level BPE tokenizer of CLIP's layout without merges (the 256 bytes, each also as a word end):
    one token per character, so it needs no vocabulary file from the hub."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[])


def save_clip(folder: str | Path, seed: int = 0, text: dict | None = None, vision: dict | None = None,
              projection_dim: int = 512) -> Path:
    """A random CLIPModel (default: ViT-B/32's towers) with a tokenizer and image processor beside it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = clip_tokenizer()
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    vision = {"image_size": 224, "patch_size": 32, **(vision or {})}
    config = CLIPConfig(text_config={"max_position_embeddings": 77, **special, **(text or {})}, vision_config=vision,
                        projection_dim=projection_dim)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    side = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(folder)
    return Path(folder)


def save_sdvae(folder: str | Path, seed: int = 0, **config: object) -> Path:
    """A random AutoencoderKL (default: Stable Diffusion's VAE) in diffusers' save_pretrained layout."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(**{**SD_VAE, **config}).save_pretrained(folder)
    return Path(folder)


def save_bert(folder: str | Path, tiny: bool = False, words: Iterable[str] = ()) -> Path:
    """A random BertModel (bert-base, or test size where ``tiny``) with a WordPiece tokenizer whose vocabulary
    is the characters (each also as a word piece) plus ``words`` whole: no vocabulary file from the hub.
    Give the words of the text it will read, so that it tokenises to about as many tokens as a real
    vocabulary does (one per character would make every forward pass several times longer)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    pieces = string.ascii_lowercase + string.digits
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *string.punctuation,
                                *(f"##{c}" for c in pieces), *words]))
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), max_position_embeddings=128, **(TINY_BERT if tiny else {}))
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def save_timm(folder: str | Path, name: str) -> Path:
    """Random weights of timm model ``name`` as ``folder/<name>.safetensors`` (n2n's timm expert loads them)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = Path(folder) / f"{name}.safetensors"
    save_file(timm.create_model(name, pretrained=False).state_dict(), str(path))
    return path
