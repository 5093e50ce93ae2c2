"""The MLP-Gaussian law p(target | source) = N(g(source), Sigma): a nonlinear mean under a Gaussian residual.

The linear-Gaussian law (cinn.gaussian) is the floor every translator must clear, and its mean is the
least-squares map. Where the source says more than a linear map can read (an image's colour is a
nonlinear function of an autoencoder's latent), a small MLP regression predicts the target better: on the
demo's image -> text view n2n-eval's MLP lets the judge find the image in the nearest caption 58% of the
time, where a translator started at the linear law found it 35% of the time at any temperature. Started at
this law instead (``FlowConfig.base = "mlp"``), a translator's temperature 0 is the MLP's prediction, refined
by the flow, and temperature 1 the full conditional distribution.

The MLP is fitted first, by mean squared error, on four folds in five of the train pairs (whole groups, as
the linear law's cross-validation holds them out); Sigma is the covariance of its residuals on the fifth,
its correlations shrunk and its variances floored as the linear law's are (cinn.gaussian says why), so the
law's held-out NLL does not report the residuals the MLP overfits to. The mean is then fitted again on every
pair: the law's mean is the best regression the pairs give, its spread an honest one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from n2n.cinn.gaussian import (
    FOLDS,
    VARIANCE_FLOOR,
    GaussianLaw,
    _cholesky,
    _choose_shrinkage,
    _covariance,
    _moments,
)

HIDDEN = 512  # the MLP's width: n2n-eval's MLP baseline's


def mean_mlp(source_dim: int, target_dim: int, hidden: int = HIDDEN) -> nn.Sequential:
    """source -> target through two hidden layers of ``hidden`` (LeakyReLU): n2n-eval's MLP baseline and the
    mean of ``MLPGaussian``, one architecture."""
    return nn.Sequential(nn.Linear(source_dim, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, target_dim))


@torch.enable_grad()
def fit_mean_mlp(source: Tensor, target: Tensor, steps: int = 2000, batch_size: int = 256, hidden: int = HIDDEN,
                 lr: float = 1e-3, seed: int = 0) -> nn.Sequential:
    """``mean_mlp`` fitted to source [N, ds] -> target [N, dt] by mean squared error with Adam, in float32 on the
    rows' device; deterministic from ``seed``, and frozen (eval mode, no gradients) when returned. The rows may be
    anything indexed by a tensor of rows with a ``shape`` and a ``device`` (a view's ``train.data.Rows``). Gradients
    are on even when called under ``no_grad`` (n2n-eval trains its baseline on a predictor's first call)."""
    torch.manual_seed(seed)
    net = mean_mlp(source.shape[1], target.shape[1], hidden).to(source.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(target), (batch_size,), generator=generator)
        loss = (net(source[idx].float()) - target[idx].float()).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval().requires_grad_(False)


@dataclass(frozen=True)
class MLPGaussian(GaussianLaw):
    """p(target | source) = N(net(source), Sigma), ``net`` a ``mean_mlp``; Sigma from held-out residuals.

    The same interface as ``LinearGaussian`` (``mean``, ``sample``, ``nll``, ``nll_bits_per_dim``,
    ``describe``, ``cov``, ``chol``), so a translator starts from either (``LinearGaussianStage.start_from``).
    """

    net: nn.Sequential  # float32, frozen
    cov: Tensor  # [dt, dt] float64
    chol: Tensor  # [dt, dt] lower Cholesky factor of cov
    shrinkage: float = 0.0  # the correlation shrinkage the residuals chose
    floored: int = 0  # target dims at the variance floor
    steps: int = 0  # the MLP's training steps

    @classmethod
    def fit(cls, source: Tensor, target: Tensor, groups: Tensor | None = None, steps: int = 2000,
            hidden: int = HIDDEN, seed: int = 0, variance_floor: float | None = None) -> MLPGaussian:
        """Fit on train pairs: source [N, ds], target [N, dt]; ``groups`` [N] as ``LinearGaussian.fit`` takes
        them (rows sharing a target are held out together). With fewer than two groups the residuals are
        the training rows' own."""
        variance_floor = VARIANCE_FLOOR if variance_floor is None else variance_floor
        if source.ndim != 2 or target.ndim != 2 or len(source) != len(target) or len(source) == 0:
            raise ValueError(f"fit needs source [N, ds] and target [N, dt] with the same N > 0, got "
                             f"{tuple(source.shape)}, {tuple(target.shape)}")
        groups = torch.arange(len(source)) if groups is None else torch.as_tensor(groups).long().cpu()
        scored = (groups % FOLDS == 0).to(source.device)
        if int(scored.sum()) == 0 or int((~scored).sum()) == 0:
            scored = torch.ones(len(source), dtype=torch.bool, device=source.device)
            fitted_on = scored
        else:
            fitted_on = ~scored
        net = fit_mean_mlp(source[fitted_on], target[fitted_on], steps, hidden=hidden, seed=seed)
        y = target.double()
        with torch.no_grad():
            residual = y[scored] - net(source[scored].float()).double()
        spread = (y - y.mean(0)).pow(2).mean(0)
        typical = float(spread.mean()) if float(spread.mean()) > 0 else 1.0
        floor = variance_floor * torch.where(spread > 0, spread, typical)
        shrinkage = _choose_shrinkage(residual, floor, groups[scored.cpu()] // FOLDS)
        cov = _covariance(*_moments(residual), floor, shrinkage)
        floored = int((residual.pow(2).mean(0) < floor).sum())
        if not bool(fitted_on.all()):  # the mean from every pair; Sigma stays the held-out residuals'
            net = fit_mean_mlp(source, target, steps, hidden=hidden, seed=seed)
        return cls(net=net, cov=cov, chol=_cholesky(cov), shrinkage=shrinkage, floored=floored, steps=steps)

    @property
    def dim(self) -> int:
        """Dimensions of the target."""
        return self.cov.shape[0]

    @property
    def hidden(self) -> int:
        """The MLP's width."""
        return self.net[0].out_features

    def describe(self) -> str:
        """One line on what this law is, as n2n-train prints it."""
        return (f"MLP-Gaussian law, N(mlp(c), Sigma) over {self.dim} dims: an MLP of width {self.hidden} "
                f"({self.steps} steps), Sigma of the residuals of one fitted on 4/5 of the pairs on the rest, "
                f"correlations shrunk by {self.shrinkage:g}; "
                f"{self.floored} dims at the variance floor")

    def _mean64(self, source: Tensor) -> Tensor:
        with torch.no_grad():
            return self.net(source.float()).double()

    def mean(self, source: Tensor) -> Tensor:
        """The MLP's prediction: [N, ds] -> [N, dt]."""
        return self._mean64(source).to(source.dtype)
