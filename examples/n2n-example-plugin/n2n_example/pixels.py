"""pixels[:SIDE][@latent]: an image expert with its own decoder, built from a seed (no weight files).

An image's latent is its SIDE x SIDE thumbnail (RGB in [0, 1], flattened) turned by a fixed
rotation, an orthogonal matrix drawn from ``SEED``: as many dims as pixel values, and ``decode``
applies the transpose, so a latent decodes back to its thumbnail exactly. It is the smallest thing
that fulfils the ``n2n.Expert`` contract for both directions; an expert wrapping a trained network
has the same five methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.functional import to_tensor

from n2n.extract.experts import Expert, ExpertError, rgb

SEED = 0
DEFAULT_SIDE = 8
MAX_SIDE = 32  # the rotation has (3 * SIDE^2)^2 entries: 38 MB at 32


def rotation(dim: int, seed: int) -> torch.Tensor:
    """A [dim, dim] orthogonal matrix drawn from ``seed`` alone (QR of a Gaussian matrix, signs fixed
    so that the draw decides it)."""
    gaussian = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * r.diagonal().sign()).float()


class Rotation(nn.Module):
    """x -> x Q^T and back. Q is a parameter, not a buffer, so that n2n digests it and moves it with ``to``."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(rotation(dim, seed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight


class PixelExpert(Expert):
    """Layer "latent": the rotated thumbnail. Rows are thumbnails made in the loader workers."""

    modality = "image"
    can_decode = True

    def __init__(self, side: int, layer: str | None) -> None:
        self.side = side
        dim = 3 * side * side
        super().__init__(f"pixels:{side}", f"pixels-{side}", f"rotation drawn from seed {SEED}", Rotation(dim, SEED),
                         ("latent",), {"latent": dim}, layer)

    def rows(self, item: dict) -> list[torch.Tensor]:
        thumbnail = rgb(item["image"]).resize((self.side, self.side), Image.Resampling.BILINEAR)
        return [to_tensor(thumbnail).flatten()]

    def collate(self, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"pixels": torch.stack(rows)}

    def forward(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"latent": self.network(batch["pixels"])}

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Thumbnails [B, 3, SIDE, SIDE] in [0, 1]."""
        with torch.inference_mode():
            pixels = self.network.inverse(latent.to(self.device, torch.float32))
        return pixels.clamp(0, 1).view(-1, 3, self.side, self.side)

    def preprocess(self) -> dict:
        return {"side": self.side, "resize": "bilinear, whole image", "range": [0, 1], "order": "CHW"}


def load(model: str | None, layer: str | None, weights: str | None) -> PixelExpert:
    """pixels[:SIDE][@latent]; SIDE (default 8) is the thumbnail's side in pixels."""
    if weights is not None:
        raise ExpertError(f"pixels builds its weights from seed {SEED}; it takes no --weights (got {weights})")
    side = model or str(DEFAULT_SIDE)
    if not side.isdigit() or not 1 <= int(side) <= MAX_SIDE:
        raise ExpertError(f"pixels:{model}: SIDE must be an integer in 1..{MAX_SIDE}, e.g. pixels:8")
    return PixelExpert(int(side), layer)
