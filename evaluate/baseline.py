"""The deterministic baseline of the paper's cINN-vs-MLP comparison: regress the target latent.

Trained on the same view, split and standardisation as the cINN, with MSE. It can only predict
the conditional mean: right where the caption pins the image down, and one blurred average
where the caption leaves attributes open (zero diversity by construction). The other baseline,
the linear least-squares map, is the mean of the linear-Gaussian floor (``train.heldout.fit_floor``); the
orthogonal Procrustes map (``fit_procrustes``) is the closed form of Maiorca et al. 2023.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from n2n.train.data import PairedLatents


@torch.enable_grad()
def train_mlp(data: PairedLatents, steps: int = 2000, batch_size: int = 256, hidden: int = 512,
              lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Fit source -> target (both standardised) by MSE; deterministic from the seed. Gradients are on
    even when called under ``no_grad`` (n2n.evaluate trains it on a predictor's first call)."""
    torch.manual_seed(seed)
    source_dim, target_dim = data.source.shape[1], data.target.shape[1]
    mlp = nn.Sequential(nn.Linear(source_dim, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(),
                        nn.Linear(hidden, target_dim))
    optimizer = torch.optim.Adam(mlp.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(data.target), (batch_size,), generator=generator)
        loss = (mlp(data.source[idx]) - data.target[idx]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return mlp.eval()


def fit_procrustes(source: torch.Tensor, target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The orthogonal Procrustes map of Maiorca et al. 2023 on standard-scaled latents: the rotation R
    minimising |[source, 0] R - [target, 0]| (the narrower side zero-padded to the wider), R = U V^T from
    the SVD of the padded cross-covariance. Returns source [N, ds] -> target [N, dt], both standardised
    (as n2n's pairs are): a closed-form translator that can only rotate, the baseline below least squares."""
    width = max(source.shape[1], target.shape[1])
    pad = lambda x: torch.nn.functional.pad(x.double(), (0, width - x.shape[1]))  # noqa: E731
    u, _, vh = torch.linalg.svd(pad(source).T @ pad(target))
    rotation = u @ vh
    dt = target.shape[1]
    return lambda c: (pad(c) @ rotation)[:, :dt].to(c.dtype)
