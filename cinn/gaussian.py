"""The linear-Gaussian law p(target | source) = N(W source + b, Sigma): the density a flow must beat.

Its held-out NLL is the floor n2n-train prints and n2n-eval reports, and its mean the linear
least-squares translator they read a run against. Pure torch, float64 throughout; the trainer and
the evaluation both use it, so it lives beside the flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from n2n.cinn.loss import LOG_2PI, bits_per_dim

RIDGE = 1e-6  # relative to the source's mean per-dimension variance: a no-op where it is well posed


def _least_squares(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(W [dy, dx], b [dy]) minimising |y - x W^T - b|^2 + ridge |W|^2, all float64 (x: the source, y: the
    target).

    Solved through the normal equations on centred data, (Xc^T Xc + ridge I) W^T = Xc^T Yc, by a
    Cholesky factor: one [dx, dx] Gram matrix instead of a QR of the whole [n, dx] design, about 3x
    faster than lstsq for 50k pairs of 384 dims on a CPU; float64 keeps the squared condition number
    harmless. The ridge is RIDGE times x's mean per-dimension variance (for a well-posed x it moves W
    by ~1e-6 relatively) and makes the system positive definite whatever x is (duplicated or constant
    columns, fewer rows than columns). The intercept has no ridge: b is the exact one.
    """
    n, dx = x.shape
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    scale = float(xc.pow(2).sum()) / (n * dx) if n and dx else 0.0
    ridge = RIDGE * (scale if scale > 0 else 1.0) * max(n, 1)
    gram = xc.T @ xc + ridge * torch.eye(dx, dtype=x.dtype, device=x.device)
    weight = torch.cholesky_solve(xc.T @ yc, torch.linalg.cholesky(gram)).T.contiguous()  # [dy, dx]
    return weight, y_mean - weight @ x_mean


def _cholesky(cov: Tensor) -> Tensor:
    """Lower Cholesky factor of ``cov``; where it is singular (fewer residuals than dimensions, an
    exactly predictable coordinate) a jitter of 1e-10 x the mean variance, grown tenfold until it
    succeeds, is added to the diagonal, so the NLL stays finite instead of failing."""
    factor, info = torch.linalg.cholesky_ex(cov)
    mean_var = float(torch.diagonal(cov).mean()) if len(cov) else 0.0
    jitter = 1e-10 * (mean_var if mean_var > 0 else 1.0)
    eye = torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
    while int(info) != 0:
        factor, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        jitter *= 10
    return factor


@dataclass(frozen=True)
class LinearGaussian:
    """p(target | source) = N(W source + b, Sigma): the floor a conditional flow must clear.

    (W, b) is the least-squares fit (lightly ridged, see ``_least_squares``); its mean is the
    "linear" translation baseline of Maiorca et al. 2023. Sigma is the maximum-likelihood (divide
    by N) full covariance of the training residuals, so this is the exact Gaussian MLE of p(y | x)
    among linear means. Parameters are float64; outputs come back in the dtype of the source given.
    Fit it on the same units as the flow's NLL (standardised source, target in store units) and
    the two bits/dim are directly comparable.
    """

    weight: Tensor  # [dy, dx]
    bias: Tensor  # [dy]
    cov: Tensor  # [dy, dy]
    chol: Tensor  # [dy, dy] lower Cholesky factor of cov (jittered only where cov is singular)

    @classmethod
    def fit(cls, source: Tensor, target: Tensor) -> LinearGaussian:
        """Fit on train pairs: source [N, ds], target [N, dt]."""
        if source.ndim != 2 or target.ndim != 2 or len(source) != len(target) or len(source) == 0:
            raise ValueError(f"fit needs source [N, ds] and target [N, dt] with the same N > 0, got "
                             f"{tuple(source.shape)}, {tuple(target.shape)}")
        source, target = source.double(), target.double()
        weight, bias = _least_squares(source, target)
        residual = target - source @ weight.T - bias
        cov = residual.T @ residual / len(source)
        return cls(weight=weight, bias=bias, cov=cov, chol=_cholesky(cov))

    @property
    def dim(self) -> int:
        """Dimensions of the target."""
        return self.weight.shape[0]

    def _mean64(self, source: Tensor) -> Tensor:
        return source.double() @ self.weight.T + self.bias

    def mean(self, source: Tensor) -> Tensor:
        """The least-squares prediction W source + b: [N, ds] -> [N, dt]."""
        return self._mean64(source).to(source.dtype)

    def sample(self, source: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws per row, row-major like ``repeat_interleave`` (the shape of a ``Predictor``): [N * n, dt]."""
        mean = self._mean64(source).repeat_interleave(n, 0)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return (mean + noise @ self.chol.T).to(source.dtype)

    def nll(self, source: Tensor, target: Tensor) -> Tensor:
        """Per-row -log p(target | source) in nats (float64): [N]."""
        residual = (target.double() - self._mean64(source)).T  # [dt, N]
        z = torch.linalg.solve_triangular(self.chol, residual, upper=False)
        half_logdet = torch.log(torch.diagonal(self.chol)).sum()
        return 0.5 * z.pow(2).sum(0) + 0.5 * self.dim * LOG_2PI + half_logdet

    def nll_bits_per_dim(self, source: Tensor, target: Tensor, chunk: int = 65536) -> float:
        """Mean held-out NLL in bits/dim, the unit of ``heldout_bpd``; in chunks of rows to bound memory."""
        if len(source) == 0:
            raise ValueError("nll_bits_per_dim needs at least one row")
        total = sum(float(self.nll(source[i : i + chunk], target[i : i + chunk]).sum())
                    for i in range(0, len(source), chunk))
        return float(bits_per_dim(total / len(source), self.dim))
