"""ae:PATH: a convolutional autoencoder trained by n2n, as an expert that both encodes and decodes.

net2net trains its own autoencoders as experts too; here one gives the offline demo an image
generator: ``shapes`` images -> ``ae`` latents, and a cINN from ``minilm`` latents into them
becomes text-to-image. Saved as ``PATH/config.json`` + ``PATH/model.safetensors``, written into a
temporary folder and renamed into place, so a crash never leaves a half-written expert.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms

from n2n.extract.experts import Expert, ExpertError, first_line, folder_name, rgb, save_model_folder

FORMAT = "n2n-conv-autoencoder"
CONFIG, WEIGHTS = "config.json", "model.safetensors"


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: a latent must not depend on the other images of its batch.
    return nn.Sequential(conv, nn.GroupNorm(math.gcd(channels, 8), channels), nn.SiLU())


class Upsample2x(nn.Module):
    """Nearest-neighbour upsampling by 2, the values of ``nn.Upsample(scale_factor=2)``, as a broadcast and
    a reshape: torch's own kernel was half the decoder's time on a 2-core CPU decoding 1024 latents, as
    n2n-eval does (``python -m bench.ae_decode``: 1.95x; a training step at batch 32 is unchanged). It holds
    no parameters, so checkpoints are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class ConvAutoencoder(nn.Module):
    """Images [B, 3, S, S] in [0, 1] <-> latents [B, latent_dim].

    Encoder: one stride-2 conv block per entry of ``channels``, then a linear map to the latent.
    Decoder: a linear map back, one upsample + conv block per entry in reverse, a conv to RGB and a
    sigmoid (nearest upsampling + conv avoids the checkerboard of transposed convolutions).

    ``variational``: the encoder also gives a log-variance and training decodes a sample of the
    posterior (a VAE, as net2net's autoencoders are). Why it matters here: a cINN sampling an open
    caption ("a red circle", position unsaid) puts some samples between the modes; a plain
    autoencoder decodes those to blends of no colour, a VAE's decoder has learnt that region. The
    stored latent is the posterior mean, so extraction stays deterministic.
    """

    def __init__(self, image_size: int = 64, channels: Sequence[int] = (32, 64, 128, 256), latent_dim: int = 128,
                 variational: bool = False):
        super().__init__()
        side = image_size // 2 ** len(channels)
        if side < 1 or side * 2 ** len(channels) != image_size:
            raise ValueError(f"image_size {image_size} must be a multiple of 2**{len(channels)} (one halving per "
                             "channel entry)")
        self.config = {"image_size": image_size, "channels": list(channels), "latent_dim": latent_dim,
                       "variational": variational}
        self.latent_dim, self.variational = latent_dim, variational
        self.encoder = nn.Sequential(
            *(_block(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), c_out)
              for c_in, c_out in pairwise([3, *channels])),
            nn.Flatten(), nn.Linear(channels[-1] * side * side, latent_dim * (2 if variational else 1)))
        back = [*reversed(channels), channels[0]]
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, channels[-1] * side * side), nn.Unflatten(1, (channels[-1], side, side)),
            *(nn.Sequential(Upsample2x(), _block(nn.Conv2d(c_in, c_out, 3, padding=1), c_out))
              for c_in, c_out in pairwise(back)),
            nn.Conv2d(channels[0], 3, 3, padding=1), nn.Sigmoid())

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean and log-variance of q(z | x); the log-variance is None for a plain autoencoder."""
        h = self.encoder(x * 2 - 1)
        if not self.variational:
            return h, None
        mean, logvar = h.split(self.latent_dim, dim=1)
        return mean, logvar.clamp(-30, 20)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (of a posterior sample while training) and KL(q(z|x) || N(0, I)) per image, in nats."""
        mean, logvar = self.posterior(x)
        if logvar is None:
            return self.decode(mean), mean.new_zeros(len(x))
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.training else mean
        return self.decode(z), 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(1)


def save_autoencoder(model: ConvAutoencoder, path: str | Path) -> Path:
    """Write ``model`` to the folder ``path`` atomically (safetensors + config.json)."""
    return save_model_folder(model, {"format": FORMAT, **model.config}, path, WEIGHTS, CONFIG)


def load_autoencoder(path: str | Path) -> ConvAutoencoder:
    """The autoencoder saved at ``path`` in eval mode; FileNotFoundError / ValueError for anything else."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"no autoencoder at {path}: expected {path / CONFIG} and {path / WEIGHTS}")
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    if config.pop("format", None) != FORMAT:
        raise ValueError(f"{path / CONFIG} is not an n2n autoencoder config (format {FORMAT!r})")
    model = ConvAutoencoder(**config)
    load_model(model, str(path / WEIGHTS))
    return model.eval()


def ae_transform(image_size: int) -> transforms.Compose:
    """PIL image -> [3, S, S] in [0, 1]: shorter side resized to S, centre crop (the trainer uses it too)."""
    return transforms.Compose([transforms.Resize(image_size, antialias=True), transforms.CenterCrop(image_size),
                               transforms.ToTensor()])


def ae_name(folder: str) -> str:
    """Store folder name: ae-<folder>, without doubling a prefix the folder already has (ae-shapes)."""
    name = folder_name(folder)
    return name if name.startswith("ae-") else f"ae-{name}"


class AutoencoderExpert(Expert):
    """Layer "latent" = the encoder's output; ``decode`` = the decoder."""

    modality = "image"
    can_decode = True

    def __init__(self, path: str, weights: str | None, layer: str | None) -> None:
        source = weights or path
        try:
            network = load_autoencoder(source)
        except (OSError, ValueError, RuntimeError) as err:
            raise ExpertError(f"ae:{path}: {first_line(err)}; give the folder as ae:PATH or --weights PATH") from err
        self.image_size = network.config["image_size"]
        self.transform = ae_transform(self.image_size)
        super().__init__(f"ae:{path}", ae_name(Path(path).name), source, network, ("latent",),
                         {"latent": network.config["latent_dim"]}, layer)

    def rows(self, item: dict) -> list[torch.Tensor]:
        return [self.transform(rgb(item["image"]))]

    def collate(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": torch.stack(rows)}

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"latent": self.network.encode(batch["image"])}

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [0, 1]."""
        with torch.inference_mode():
            return self.network.decode(latent.to(self.device, torch.float32))

    def preprocess(self) -> dict:
        return {"image_size": self.image_size, "resize": "shorter side, bilinear, antialias", "crop": "center",
                "range": [0, 1]}


def load(model: str | None, layer: str | None, weights: str | None) -> AutoencoderExpert:
    """ae:PATH[@latent]; ``--weights PATH`` alone names the folder too."""
    path = model or weights
    if not path:
        raise ExpertError("ae needs the folder of a saved autoencoder: ae:PATH or --weights PATH")
    return AutoencoderExpert(path, weights, layer)
