"""The deterministic baseline of the paper's cINN-vs-MLP comparison: regress the target latent.

Trained on the same view, split and standardisation as the cINN, with MSE. It can only predict
the conditional mean: right where the caption pins the image down, and one blurred average
where the caption leaves attributes open (zero diversity by construction). The other baseline,
the linear least-squares map, is the mean of the linear-Gaussian floor (``train.heldout.fit_floor``); the
orthogonal Procrustes map (``fit_procrustes``) is the closed form of Maiorca et al. 2023.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from n2n.cinn.lowrank_gaussian import FULL_WIDTH, principal_directions
from n2n.cinn.mlp_gaussian import fit_mean_mlp
from n2n.train.data import BLOCK_ROWS, PairedLatents, Rows, subsample
from n2n.train.heldout import ROW_NUMBERS

SUBSPACE_RANK = 256  # principal directions of a target wider than FULL_WIDTH (see Subspace)


@dataclass(frozen=True)
class Subspace:
    """The top principal directions of a view's standardised train targets, where they are wider than FULL_WIDTH.

    Why: the MLP baseline's output layer grows with the target, and at 65,536 dims its 2,000 steps take half an
    hour on a CPU. There it regresses the targets' coordinates in this subspace instead; with a few thousand
    train pairs little outside it is predictable anyway. The distribution scores are measured on the same
    coordinates (a k-NN search over 2,000 rows of 65,536 dims costs half a minute a set). n2n-eval states it in
    the report (``describe``).
    """

    mean: Tensor  # [d]
    basis: Tensor  # [d, k], orthonormal columns
    variance: float  # the share of the train targets' variance inside it

    @classmethod
    def fit(cls, target: Rows, rank: int = SUBSPACE_RANK, seed: int = 0) -> Subspace:
        """From at most ROW_NUMBERS / d seeded train rows (the low-rank law's budget): a randomized SVD, O(d·k)."""
        dim = target.shape[1]
        rows = target[torch.from_numpy(subsample(len(target), max(2, ROW_NUMBERS // dim), seed))]
        mean = rows.mean(0)
        centred = rows - mean
        values, basis = principal_directions(centred, min(rank, len(rows) - 1))
        variance = float(values.sum() * len(rows) / centred.pow(2).sum())
        return cls(mean.float(), basis.float(), variance)

    def coordinates(self, rows: Rows | Tensor) -> Tensor:
        """Every row's coordinates [N, k] (standardised rows), a block at a time."""
        return torch.cat([(rows[i : i + BLOCK_ROWS] - self.mean) @ self.basis
                          for i in range(0, len(rows), BLOCK_ROWS)])

    def decoder(self) -> nn.Linear:
        """Coordinates -> standardised targets, as a frozen layer."""
        layer = nn.Linear(*self.basis.T.shape).requires_grad_(False)
        layer.weight.copy_(self.basis)
        layer.bias.copy_(self.mean)
        return layer

    def describe(self) -> str:
        return (f"the top {self.basis.shape[1]} principal directions of the train targets "
                f"({100 * self.variance:.1f}% of their variance)")


def train_mlp(data: PairedLatents, steps: int = 2000, batch_size: int = 256, hidden: int = 512,
              lr: float = 1e-3, seed: int = 0, subspace: Subspace | None = None) -> nn.Module:
    """Fit source -> target (both standardised) by MSE; deterministic from the seed (``cinn.mlp_gaussian``'s
    ``fit_mean_mlp``: the mean of the MLP-Gaussian law a translator can start from is this same regression).
    With a ``subspace``, the MLP regresses the targets' coordinates there, decoded back to every dim."""
    if subspace is None:
        return fit_mean_mlp(data.source, data.target, steps, batch_size, hidden, lr, seed)
    net = fit_mean_mlp(data.source, subspace.coordinates(data.target), steps, batch_size, hidden, lr, seed)
    return nn.Sequential(net, subspace.decoder()).eval()


def wide(data: PairedLatents) -> bool:
    """Whether a view's targets are too wide for the MLP baseline's own output layer (see ``Subspace``)."""
    return data.target.shape[1] > FULL_WIDTH


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
