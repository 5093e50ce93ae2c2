"""classifier:PATH[@layer]: a small CNN classifier n2n trains (n2n-train-classifier), every layer extractable.

An expert whose invariances are known by construction, so that a diagnosis (``n2n.diagnose``) can be
checked: trained on ``shapes`` to name the shape alone, with colour, size and position varied and never
named, its last layers have no reason to keep colour or position, and its global pooling takes position
away outright, while its first block still sees colours in place. A correct diagnosis finds that.

Layers, from the input up:
- ``block1`` .. ``blockK``: each stride-2 conv block's feature map, average-pooled to ``grid`` x ``grid``
  cells and flattened (channels x grid²): a coarse map that still says where;
- ``pool``: the last block globally averaged (the features the head reads; the default, as timm's);
- ``logits``: the head's class scores.
Saved as ``PATH/config.json`` + ``PATH/model.safetensors``, atomically (``save_model_folder``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import torch
from torch import nn

from n2n.extract.experts import Expert, ExpertError, first_line, folder_name, rgb, save_model_folder
from n2n.extract.experts.ae import ae_transform

FORMAT = "n2n-conv-classifier"
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def conv_bn_block(c_in: int, c_out: int) -> nn.Sequential:
    """A stride-2 conv, BatchNorm and ReLU, as classifiers are built, with two choices that keep the
    architecture from deciding an invariance that training should:

    - BatchNorm, not the autoencoder's GroupNorm: with a group per channel (8 channels, 8 groups) GroupNorm
      normalises each channel over the image and so erases colour at the first block. A frozen BatchNorm is a
      fixed affine map per channel, so a row's features never depend on its batch.
    - circular padding: zero padding shows a CNN where the image's border is, and its features then say
      where a shape lies (the diagnosis found position kept in 28.6% of the logits' samples, 2.5x chance;
      with circular padding 12.1%, docs/benchmarks.md "Diagnosis").
    """
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, padding_mode="circular"), nn.BatchNorm2d(c_out),
                         nn.ReLU())


class ConvClassifier(nn.Module):
    """Images [B, 3, S, S] in [0, 1] -> class logits, through one stride-2 conv block per entry of ``channels``
    (``conv_bn_block``), a global average and a linear head.

    ``label`` is the attribute it names and ``classes`` its values, in the head's order.
    """

    def __init__(self, label: str, classes: Sequence[str], image_size: int = 64,
                 channels: Sequence[int] = (8, 16, 32, 32), grid: int = 4) -> None:
        super().__init__()
        side = image_size // 2 ** len(channels)
        if side < grid or side * 2 ** len(channels) != image_size:
            raise ValueError(f"image_size {image_size} must be a multiple of 2**{len(channels)} leaving at least "
                             f"{grid} px after the last block")
        self.config = {"label": label, "classes": list(classes), "image_size": image_size,
                       "channels": list(channels), "grid": grid}
        self.grid = grid
        self.blocks = nn.ModuleList(conv_bn_block(c_in, c_out) for c_in, c_out in pairwise([3, *channels]))
        self.head = nn.Linear(channels[-1], len(classes))

    @property
    def layers(self) -> tuple[str, ...]:
        return ("pool", *(f"block{k}" for k in range(1, len(self.blocks) + 1)), "logits")

    def dims(self) -> dict[str, int]:
        channels = self.config["channels"]
        return {"pool": channels[-1], **{f"block{k}": c * self.grid**2 for k, c in enumerate(channels, 1)},
                "logits": len(self.config["classes"])}

    def features(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """{layer: [B, dim]} for each of ``layers``, from one pass."""
        out, h = {}, x * 2 - 1
        for k, block in enumerate(self.blocks, 1):
            h = block(h)
            if f"block{k}" in layers:
                out[f"block{k}"] = nn.functional.adaptive_avg_pool2d(h, self.grid).flatten(1)
        pooled = h.mean((2, 3))
        if "pool" in layers:
            out["pool"] = pooled
        if "logits" in layers:
            out["logits"] = self.head(pooled)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x, ("logits",))["logits"]


def save_classifier(model: ConvClassifier, path: str | Path) -> Path:
    """Write ``model`` to the folder ``path`` atomically (safetensors + config.json)."""
    return save_model_folder(model, {"format": FORMAT, **model.config}, path, WEIGHTS, CONFIG)


def load_classifier(path: str | Path) -> ConvClassifier:
    """The classifier saved at ``path`` in eval mode; FileNotFoundError / ValueError for anything else."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"no classifier at {path}: expected {path / CONFIG} and {path / WEIGHTS}")
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    if config.pop("format", None) != FORMAT:
        raise ValueError(f"{path / CONFIG} is not an n2n classifier config (format {FORMAT!r})")
    model = ConvClassifier(**config)
    load_model(model, str(path / WEIGHTS))
    return model.eval()


class ClassifierExpert(Expert):
    """Every layer of a ``ConvClassifier`` (module docstring); it reads images, it does not decode."""

    modality = "image"

    def __init__(self, path: str, weights: str | None, layer: str | None) -> None:
        source = weights or path
        try:
            network = load_classifier(source)
        except (OSError, ValueError, RuntimeError) as err:
            raise ExpertError(f"classifier:{path}: {first_line(err)}; give the folder as classifier:PATH or "
                              "--weights PATH (n2n-train-classifier makes one)") from err
        self.image_size = network.config["image_size"]
        self.transform = ae_transform(self.image_size)
        name = folder_name(Path(path).name)
        name = name if name.startswith("classifier") else f"classifier-{name}"  # no classifier-classifier-shapes
        super().__init__(f"classifier:{path}", name, source, network, network.layers, network.dims(), layer)

    def rows(self, item: dict) -> list[torch.Tensor]:
        return [self.transform(rgb(item["image"]))]

    def collate(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": torch.stack(rows)}

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.network.features(batch["image"], layers)

    def preprocess(self) -> dict:
        return {"image_size": self.image_size, "resize": "shorter side, bilinear, antialias", "crop": "center",
                "range": [0, 1]}


def load(model: str | None, layer: str | None, weights: str | None) -> ClassifierExpert:
    """classifier:PATH[@layer]; ``--weights PATH`` alone names the folder too."""
    path = model or weights
    if not path:
        raise ExpertError("classifier needs the folder of a saved classifier: classifier:PATH[@layer] or "
                          "--weights PATH (n2n-train-classifier makes one)")
    return ClassifierExpert(path, weights, layer)
