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

from n2n.cinn.mlp_gaussian import fit_mean_mlp
from n2n.train.data import PairedLatents


def train_mlp(data: PairedLatents, steps: int = 2000, batch_size: int = 256, hidden: int = 512,
              lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """Fit source -> target (both standardised) by MSE; deterministic from the seed (``cinn.mlp_gaussian``'s
    ``fit_mean_mlp``: the mean of the MLP-Gaussian law a translator can start from is this same regression)."""
    return fit_mean_mlp(data.source, data.target, steps, batch_size, hidden, lr, seed)


def fit_procrustes(source: torch.Tensor, target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The orthogonal Procrustes map of Maiorca et al. 2023 on standard-scaled latents: the rotation R
    minimising |[source, 0] R - [target, 0]| (the narrower side zero-padded to the wider), R = U V^T from
    the SVD of the padded cross-covariance. Returns source [N, ds] -> target [N, dt], both standardised
    (as n2n's pairs are): a closed-form translator that can only rotate, the baseline below least squares.

    Only R's block [ds, dt] maps a padded source onto the target's dims, and it is U V^T of the thin SVD of
    the unpadded cross-covariance source^T target ([ds, dt]) wherever that has full rank: so no
    max(ds, dt)-square matrix is formed (65,536-dim targets: 384 x 65,536, not 65,536^2)."""
    u, _, vh = torch.linalg.svd(source.double().T @ target.double(), full_matrices=False)
    rotation = u @ vh  # [ds, dt]
    return lambda c: (c.double() @ rotation).to(c.dtype)
