"""biggan[:biggan-deep-128|256|512]: the BigGAN-deep generator of pytorch-pretrained-biggan.

BigGAN has no image encoder, so its latent is the generator's own input, as in net2net:
[z (128) ; class embedding (128)] = 256 dims, the embedding being the generator's linear class
embedding of the one-hot class. It reads the ``biggan`` modality (z and class of items sampled by the
``biggan`` dataset), so its store holds exactly the latents that rendered those items, and ``decode``
renders images from any such latent (e.g. a cINN sample).

Weights: the package's own hub files when online, else ``--weights``: a folder with the package's
config.json and model.safetensors or pytorch_model.bin, read with ``weights_only=True`` (the
package's ``from_pretrained`` would unpickle arbitrary objects).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from n2n.extract.experts import Expert, ExpertError, first_line, hub_offline, missing_weights

MODELS = ("biggan-deep-128", "biggan-deep-256", "biggan-deep-512")
DEFAULT_MODEL = MODELS[0]
TRUNCATION = 0.4  # the package's examples' value; it picks the generator's batch-norm statistics
LOCAL_FILES = "a folder with the package's config.json and model.safetensors or pytorch_model.bin"


def _hub_files(model: str) -> tuple[Path, Path]:
    """config.json and weights of ``model`` from the package's hub (downloaded once, then cached)."""
    from pytorch_pretrained_biggan.file_utils import cached_path
    from pytorch_pretrained_biggan.model import PRETRAINED_CONFIG_ARCHIVE_MAP, PRETRAINED_MODEL_ARCHIVE_MAP

    if hub_offline():
        raise missing_weights("biggan", model, LOCAL_FILES, "offline")
    try:
        config = cached_path(PRETRAINED_CONFIG_ARCHIVE_MAP[model])
        return Path(config), Path(cached_path(PRETRAINED_MODEL_ARCHIVE_MAP[model]))
    except (OSError, ValueError) as err:
        raise missing_weights("biggan", model, LOCAL_FILES, first_line(err)) from err


def _local_files(folder: Path) -> tuple[Path, Path]:
    """config.json and the weights file (safetensors preferred) of a local folder."""
    found = [folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()]
    if not (folder / "config.json").is_file() or not found:
        raise ExpertError(f"biggan: --weights {folder} is not {LOCAL_FILES}")
    return folder / "config.json", found[0]


def load_generator(model: str, weights: str | None) -> torch.nn.Module:
    """The BigGAN generator with its weights; missing ones are an error, never left random."""
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig
    from safetensors.torch import load_file

    config_file, weights_file = _local_files(Path(weights)) if weights else _hub_files(model)
    network = BigGAN(BigGANConfig.from_json_file(str(config_file)))
    try:
        state = (load_file(weights_file) if weights_file.suffix == ".safetensors"
                 else torch.load(weights_file, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError) as err:  # torch raises UnpicklingError (a ValueError) too
        raise ExpertError(f"biggan: cannot read {weights_file}: {first_line(err)}") from err
    # Unexpected keys are ignored as the package's from_pretrained does; missing ones would stay random.
    missing = network.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise ExpertError(f"biggan: {weights_file} lacks {len(missing)} weights of the generator, e.g. {missing[0]}")
    return network


class BigGANExpert(Expert):
    """Latent = [z ; class embedding]; decode renders with the generator at ``truncation``."""

    modality = "biggan"
    can_decode = True

    def __init__(self, model: str, weights: str | None, layer: str | None) -> None:
        network = load_generator(model, weights)
        config = network.config
        self.z_dim, self.num_classes = config.z_dim, config.num_classes
        self.truncation = TRUNCATION
        super().__init__(f"biggan:{model}", model, weights or model, network, ("latent",),
                         {"latent": 2 * config.z_dim}, layer)

    def rows(self, item: dict) -> list[tuple[torch.Tensor, int]]:
        z = torch.as_tensor(item["z"], dtype=torch.float32)
        if z.shape != (self.z_dim,):
            raise ValueError(f"biggan z must have shape ({self.z_dim},), not {tuple(z.shape)}")
        return [(z, int(item["class"]))]

    def collate(self, rows: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        return {"z": torch.stack([z for z, _ in rows]), "class": torch.tensor([c for _, c in rows], dtype=torch.long)}

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        one_hot = F.one_hot(batch["class"], self.num_classes).to(self.network.embeddings.weight.dtype)
        return {"latent": torch.cat([batch["z"].float(), self.network.embeddings(one_hot).float()], dim=1)}

    def decode(self, latent: torch.Tensor, truncation: float | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] rendered from [z ; class embedding] latents."""
        truncation = self.truncation if truncation is None else truncation
        if not 0 < truncation <= 1:
            raise ExpertError(f"biggan truncation must be in (0, 1], not {truncation}")
        with torch.inference_mode():
            images = self.network.generator(latent.to(self.device, torch.float32), truncation)
        return ((images + 1) / 2).clamp(0, 1)

    def preprocess(self) -> dict:
        return {"z_dim": self.z_dim, "num_classes": self.num_classes, "class_embedding": "linear(one_hot(class))",
                "truncation": self.truncation}


def load(model: str | None, layer: str | None, weights: str | None) -> BigGANExpert:
    """biggan[:biggan-deep-128|256|512][@latent]."""
    model = model or DEFAULT_MODEL
    if model not in MODELS:
        raise ExpertError(f"unknown BigGAN model {model!r}; known: {', '.join(MODELS)} "
                          "(give other weights with --weights PATH)")
    return BigGANExpert(model, weights, layer)
