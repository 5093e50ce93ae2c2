"""Experts: frozen networks addressed by a spec string ``name[:model][@layer]``.

One module per family; a family is imported only when a spec names it, so listing experts or
reporting a bad spec never pays for importing transformers, timm or the BigGAN package. Every
expert splits its work the same way: ``rows`` and ``collate`` run in DataLoader workers (decoding,
transforms, tokenisation), ``encode`` runs the frozen network on the device, and generators add
``decode``. ``identity`` is what a store records so that latents of different weights or
preprocessing never pair.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from n2n.errors import N2NError

# family -> module; each module has ``load(model, layer, weights) -> Expert``.
_FAMILIES = {
    "ae": "n2n.extract.experts.ae",
    "bert": "n2n.extract.experts.bert",
    "biggan": "n2n.extract.experts.biggan",
    "minilm": "n2n.extract.experts.minilm",
    "timm": "n2n.extract.experts.timm_expert",
}
# The model part is lazy so that a path keeps any '@' that is not followed by a bare layer name at the end.
_SPEC = re.compile(r"(?P<name>[A-Za-z0-9_-]+)(?::(?P<model>.+?))?(?:@(?P<layer>[A-Za-z0-9_-]+))?")


class ExpertError(N2NError):
    """A spec, layer or weights problem the user can fix; the one-line message says how."""


def known_experts() -> list[str]:
    """The family names a spec may start with, sorted."""
    return sorted(_FAMILIES)


def load_expert(spec: str, weights: str | Path | None = None) -> Expert:
    """The frozen expert named by ``spec`` ("name[:model][@layer]"), in eval mode on the CPU.

    ``weights`` (the CLI's ``--weights PATH``) is a local folder or file that replaces the model's
    usual source; without it weights come from the hub (or its local cache when offline).
    """
    match = _SPEC.fullmatch(spec.strip())
    if match is None or match["name"] not in _FAMILIES:
        raise ExpertError(f"unknown expert {spec!r}; known experts: {', '.join(known_experts())} "
                          "(spec: name[:model][@layer])")
    if weights is not None and not Path(weights).exists():
        raise ExpertError(f"--weights {weights}: no such file or folder")
    family = importlib.import_module(_FAMILIES[match["name"]])
    return family.load(match["model"], match["layer"], None if weights is None else str(weights))


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode()


def missing_weights(family: str, hub_id: str, local: str, reason: str) -> ExpertError:
    """The error for weights that are neither local nor downloadable: it names both ways to give them."""
    return ExpertError(f"{family}: no weights for {hub_id!r} ({reason}); pass --weights PATH ({local}), "
                       f"or go online so that {hub_id!r} can be downloaded")


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line, for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def folder_name(text: str) -> str:
    """``text`` made safe as one folder name (store dirs are named after experts)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "expert"


def rgb(image: Image.Image) -> Image.Image:
    """An item's image as RGB: datasets may hand over greyscale or RGBA pictures."""
    return image if image.mode == "RGB" else image.convert("RGB")


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) over the state dict: sorted names, dtypes, shapes and tensor bytes.

    It changes with any weight and not with the device, so a store can tell which weights wrote it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


class Expert(ABC):
    """A frozen network that turns dataset items into latents, and (generators) latents into images.

    Subclasses set ``modality`` and ``can_decode`` and implement ``rows``, ``collate``, ``_encode``
    and ``preprocess``. ``layers[0]`` is the layer the spec chose (or the family's default).
    """

    modality: str
    can_decode: bool = False

    def __init__(self, base_spec: str, name: str, weights: str, network: torch.nn.Module,
                 layers: Sequence[str], dims: dict[str, int], layer: str | None = None) -> None:
        self.network = network.eval().requires_grad_(False)
        self.name = name
        self.weights = weights
        self.dims = dict(dims)
        self.spec_layer = layer  # the layer the spec named, if any: it then names the store folder too
        chosen = layer or layers[0]
        if chosen not in layers:
            raise ExpertError(f"expert {base_spec} has no layer {chosen!r}; its layers: {', '.join(layers)}")
        self.layers = (chosen, *(other for other in layers if other != chosen))
        self.spec = f"{base_spec}@{chosen}"

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def to(self, device: torch.device | str) -> Expert:
        self.network.to(device)
        return self

    @abstractmethod
    def rows(self, item: dict) -> list:
        """The inputs of one item, one entry per output row (``sub`` = position in the list)."""

    @abstractmethod
    def collate(self, rows: list) -> dict[str, torch.Tensor]:
        """Rows of several items batched into tensors (CPU, in a loader worker)."""

    @abstractmethod
    def _encode(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The network's latents for each of ``layers`` (already checked), called under inference mode."""

    @abstractmethod
    def preprocess(self) -> dict:
        """The settings that shape the network's inputs (recorded in every store)."""

    def encode(self, batch: dict[str, torch.Tensor], layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """{layer: [rows, dims[layer]] float32} for each of ``layers`` (default: ``layers[0]``), from one pass."""
        layers = tuple(layers or self.layers[:1])
        unknown = [layer for layer in layers if layer not in self.layers]
        if unknown:
            raise ExpertError(f"expert {self.spec} has no layer {', '.join(unknown)}; "
                              f"its layers: {', '.join(self.layers)}")
        with torch.inference_mode():
            out = self._encode(batch, layers)
        return {layer: out[layer].float() for layer in layers}

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] from latents; only generators (biggan, ae) can."""
        raise ExpertError(f"expert {self.spec} cannot decode: it has no generator (decode with biggan or ae)")

    def identity(self) -> dict:
        """What makes two stores' latents comparable: spec, weights source and digest, preprocessing."""
        return {"spec": self.spec, "weights": self.weights, "digest": weights_digest(self.network),
                "preprocess": self.preprocess()}


__all__ = ["Expert", "ExpertError", "known_experts", "load_expert"]


def save_model_folder(module: torch.nn.Module, config: dict, path: str | Path, weights: str = "model.safetensors",
                      config_name: str = "config.json") -> Path:
    """Write a model n2n trains itself (an autoencoder expert, the shapes judge) as a folder of
    safetensors weights + JSON config, atomically: a sibling temp folder, then a rename. A folder
    cannot be renamed over another, so an older save is moved aside first and removed after."""
    from safetensors.torch import save_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_model(module, str(tmp / weights))
        (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
