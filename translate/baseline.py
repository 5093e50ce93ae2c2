"""The deterministic baseline of the paper's cINN-vs-MLP comparison: regress the target latent.

Trained on the same view, split and standardisation as the cINN, with MSE. It can only predict
the conditional mean: right where the caption pins the image down, and one blurred average
where the caption leaves attributes open (zero diversity by construction). The other baseline,
the linear least-squares map, is the mean of the linear-Gaussian floor (``train.trainer.fit_floor``).
"""

from __future__ import annotations

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
