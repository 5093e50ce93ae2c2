"""The deterministic baselines a cINN is read against: regress the target latent.

Both are fitted on the same view, split and standardisation as the cINN. The MLP (MSE) is the paper's
cINN-vs-MLP comparison; the linear map (closed-form least squares) is the simplest translator there is
(Maiorca et al. 2023 translate between latent spaces with one). Either predicts the conditional mean
only: right where the caption pins the image down, and one blurred average where the caption leaves
attributes open (zero diversity by construction).
"""

from __future__ import annotations

import torch
from torch import nn

from n2n.train.data import PairedLatents
from n2n.translate.metrics import LinearGaussian, subsample


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


def fit_linear(data: PairedLatents, rows: int = 50_000, seed: int = 0) -> LinearGaussian:
    """Least squares from source to target (both standardised) on up to ``rows`` train pairs, with the
    residual's full covariance: its ``mean`` is the linear baseline, its density the linear-Gaussian floor."""
    index = torch.from_numpy(subsample(len(data.target), rows, seed))
    return LinearGaussian.fit(data.source[index], data.target[index])
