"""The linear-Gaussian law p(target | source) = N(W source + b, Sigma): the density a flow must beat.

Its held-out NLL is the floor n2n-train prints and n2n-eval reports, and its mean the linear
least-squares translator they read a run against. Pure torch, float64 throughout; the trainer and
the evaluation both use it, so it lives beside the flow.

The law must exist for every view, so each of its parts is regularised by an amount the data choose:

- the mean map is ridge regression, each target dim's penalty the one of a grid whose predictions of
  held-out rows err least in 5-fold cross-validation, holding out whole groups (the captions of one image, as the
  held-out split does: held out one by one, an image's other captions vouch for the fit). A
  well-posed view gets a penalty near zero (least squares); a view with few pairs per source dim
  (1,283 pairs of 384 dims) no longer fits its train pairs exactly;
- the residual covariance is that of the out-of-fold residuals (each row's error under a fit that
  never saw its group), so a fit on few pairs does not report the in-sample errors it overfits to,
  and its correlations are shrunk towards none by the amount under which held-out residuals are
  likeliest (a grid, scored on a fifth of the groups; little or none, where pairs are many);
- every variance is at least VARIANCE_FLOOR of its dimension's variance (of the mean variance, for a
  constant dimension): a constant or exactly determined target dimension (a dead unit, an image's
  border) would otherwise get a variance of ~1e-10, a whitening of 1e5 that float32 training barely
  resolves, and a density no held-out pair in another precision reaches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from n2n.cinn.loss import LOG_2PI, bits_per_dim

VARIANCE_FLOOR = 1e-6  # of a dimension's variance: residual std >= 0.1% of its spread (float16 keeps ~0.05%)
RIDGE_GRID = torch.logspace(-8, 3, 23, dtype=torch.float64)  # penalties, in units of the mean Gram eigenvalue
FOLDS = 5  # cross-validation folds of the penalty (whole groups held out)
GRID_STRIDE = 3  # the penalty search's coarse step through RIDGE_GRID (``_ridge``)
SHRINKAGE_GRID = (0.0, 1e-3, 1e-2, 0.1, 0.3, 1.0)  # correlation shrinkages the cross-validation compares
SHRINKAGE_ROWS = 8192  # held-out residual rows it compares them on


@dataclass(frozen=True)
class Regularisation:
    """What the fit chose: the median of the target dims' ridge penalties (relative to the mean eigenvalue
    of the source's Gram matrix) and the mean of their effective numbers of parameters, the correlation
    shrinkage, and how many target dims sit at the variance floor."""

    ridge: float
    dof: float
    shrinkage: float
    floored: int

    def describe(self) -> str:
        return (f"ridge {self.ridge:.2g} (median; {self.dof:.1f} effective source dims), correlations shrunk by "
                f"{self.shrinkage:g}, both cross-validated; {self.floored} dims at the variance floor")


def _ridge(x: Tensor, y: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """Each target dim's ridge penalty [dy] (relative to the mean eigenvalue of the training rows' Gram
    matrix): the one of RIDGE_GRID whose predictions of held-out groups err least in FOLDS-fold
    cross-validation, and the out-of-fold residuals [n, dy] at those penalties (each row predicted by a fit
    that never saw its group).

    Folds hold out whole groups (rows of one target: the captions of one image), as n2n's held-out split
    does; held out row by row, an image's other captions would vouch for the fit. A penalty per target dim,
    because one dim may be determined by the source (a penalty of ~0) and the next mostly noise. Per fold,
    one eigendecomposition serves every penalty: with D = diag(d), d = 1 / (e + l), dim j's squared error
    |yh_j - A D b_j|^2 is |yh_j|^2 - 2 d . (A^T yh_j * b_j) + (D b_j)^T (A^T A) (D b_j)."""
    fold = groups % FOLDS
    present = torch.unique(fold)
    grid = RIDGE_GRID.to(x.dtype)
    if len(present) < 2:  # one group (or none): nothing to hold out; the least penalty, in-sample residuals
        xc, yc = x - x.mean(0), y - y.mean(0)
        relative = grid[:1].expand(y.shape[1])
        return relative, yc - xc @ _ridge_fit(xc, yc, relative)[0].T
    terms = []
    for f in present.tolist():
        held = fold == f
        x_mean, y_mean = x[~held].mean(0), y[~held].mean(0)
        xt, yt, xh, yh = x[~held] - x_mean, y[~held] - y_mean, x[held] - x_mean, y[held] - y_mean
        evals, vectors = torch.linalg.eigh(xt.T @ xt)
        evals = evals.clamp_min(0)
        a, b = xh @ vectors, vectors.T @ (xt.T @ yt)  # [nh, dx], [dx, dy]
        terms.append((held, evals, a, b, yh, a.T @ a, a.T @ yh))

    def errors(index: Tensor) -> Tensor:
        """Each target dim's cross-validated squared error at its own penalty grid[index] [dy]."""
        total = torch.zeros(y.shape[1], dtype=x.dtype, device=x.device)
        for _, evals, _, b, yh, gram, ay in terms:
            db = b / (evals[:, None] + grid[index][None, :] * _scale(evals))
            total += yh.pow(2).sum(0) - 2 * (ay * db).sum(0) + ((gram @ db) * db).sum(0)
        return total

    # Coarse to fine: every GRID_STRIDE-th penalty, then each dim's neighbours of its best: 13 passes, not 23 (a
    # pass is [dx, dx] x [dx, dy]: the fit's cost at 65,536 target dims). Where the error is unimodal in the
    # penalty this is the whole grid's best; measured on six synthetic views, 1 dim in 1,264 had two minima
    # and took the other.
    coarse = torch.tensor(sorted({*range(0, len(grid), GRID_STRIDE), len(grid) - 1}), device=x.device)
    coarse_errors = torch.stack([errors(i.expand(y.shape[1])) for i in coarse])
    pick = coarse_errors.argmin(0)
    near = (coarse[pick][None, :] + torch.arange(1 - GRID_STRIDE, GRID_STRIDE, device=x.device)[:, None]).clamp(
        0, len(grid) - 1)  # [2 stride - 1, dy], ascending: ties go to the smaller penalty, as on the whole grid
    scores = torch.stack([coarse_errors.gather(0, pick[None])[0] if offset == GRID_STRIDE - 1 else errors(index)
                          for offset, index in enumerate(near)])
    relative = grid[near.gather(0, scores.argmin(0)[None])[0]]  # [dy]
    residual = torch.empty_like(y)
    for held, evals, a, b, yh, _, _ in terms:
        residual[held] = yh - a @ (b / (evals[:, None] + relative[None, :] * _scale(evals)))
    return relative, residual


def _scale(evals: Tensor) -> float:
    """The unit of a ridge penalty: the Gram matrix's mean eigenvalue (n times the mean variance)."""
    mean = float(evals.mean()) if len(evals) else 0.0
    return mean if mean > 0 else 1.0


def _ridge_fit(xc: Tensor, yc: Tensor, relative: Tensor) -> tuple[Tensor, Tensor]:
    """(W [dy, dx], each target dim's effective number of parameters [dy]) of ridge regression of centred y
    on centred x, target dim j penalised by ``relative[j]`` times the mean Gram eigenvalue."""
    evals, vectors = torch.linalg.eigh(xc.T @ xc)
    evals = evals.clamp_min(0)
    inverse = 1 / (evals[:, None] + relative[None, :] * _scale(evals))  # [dx, dy]
    weight = (vectors @ (inverse * (vectors.T @ (xc.T @ yc)))).T.contiguous()
    return weight, (evals[:, None] * inverse).sum(0)


def _moments(residual: Tensor) -> tuple[Tensor, Tensor]:
    """The variances [d] and correlations [d, d] of ``residual`` [n, d] as second moments about zero (the
    law's mean is the fit's, about which the residuals' own mean is ~0); a dim with no variance is
    uncorrelated with the rest."""
    variance = residual.pow(2).mean(0)
    std = variance.sqrt()
    z = residual / torch.where(std > 0, std, 1.0)
    corr = z.T @ z / len(residual)
    corr.fill_diagonal_(1.0)
    return variance, corr


def _covariance(variance: Tensor, corr: Tensor, floor: Tensor, shrinkage: float) -> Tensor:
    """The covariance of these moments with every variance at least ``floor`` [d] and the correlations
    scaled by (1 - shrinkage)."""
    scale = torch.maximum(variance, floor).sqrt()
    shrunk = (1 - shrinkage) * corr
    shrunk.fill_diagonal_(1.0)
    return shrunk * scale[:, None] * scale[None, :]


def _choose_shrinkage(residual: Tensor, floor: Tensor, groups: Tensor) -> float:
    """The correlation shrinkage of SHRINKAGE_GRID under which held-out residuals are likeliest: a covariance
    fitted on the groups of four folds in five, scored on (up to SHRINKAGE_ROWS of) the fifth's. Fitted on
    most rows, not half of them, because the best amount falls with the rows: chosen on halves of the
    demo's 37,905 image -> text residuals (384 dims), 0.01 cost its law 0.08 bits/dim held-out. And a
    likelihood, not a matrix error, chooses it: with neighbouring pixels' residuals correlated at 0.99, the
    Frobenius-optimal amount of Ledoit–Wolf or Schäfer–Strimmer (0.017 on an 8x8 thumbnail view) cost 0.6
    bits/dim."""
    held = (groups.to(residual.device) % FOLDS) == 0
    if int(held.sum()) < 2 or int((~held).sum()) < 2:
        return 0.0
    moments, score_on = _moments(residual[~held]), residual[held]
    score_on = score_on[torch.linspace(0, len(score_on) - 1, min(len(score_on), SHRINKAGE_ROWS)).long()]
    scores = []
    for shrinkage in SHRINKAGE_GRID:
        chol = _cholesky(_covariance(*moments, floor, shrinkage))
        z = torch.linalg.solve_triangular(chol, score_on.T, upper=False)
        scores.append(0.5 * float(z.pow(2).sum()) + len(score_on) * float(torch.log(torch.diagonal(chol)).sum()))
    return SHRINKAGE_GRID[scores.index(min(scores))]


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


class GaussianLaw:
    """What every Gaussian law p(target | source) = N(mean(source), Sigma) offers once it has a ``_mean64``
    (float64 [N, dt]), a ``chol`` (Sigma's lower Cholesky factor) and a ``dim``: draws and its NLL."""

    chol: Tensor
    dim: int

    def _mean64(self, source: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def variance(self) -> Tensor:
        """Sigma's diagonal [dt]: each target dim's residual variance under the law."""
        return torch.diagonal(self.cov)

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

    def nll_bits_per_dim(self, source: Tensor, target: Tensor, chunk: int | None = None) -> float:
        """Mean held-out NLL in bits/dim, the unit of ``heldout_bpd``; in chunks of rows to bound memory (default:
        2^24 numbers a chunk, 65,536 rows of 256 dims, 256 of 65,536)."""
        if len(source) == 0:
            raise ValueError("nll_bits_per_dim needs at least one row")
        chunk = chunk or max(1, 2**24 // self.dim)
        total = sum(float(self.nll(source[i : i + chunk], target[i : i + chunk]).sum())
                    for i in range(0, len(source), chunk))
        return float(bits_per_dim(total / len(source), self.dim))


@dataclass(frozen=True)
class RidgeFit:
    """The parts of a law with a ridge mean that both covariances start from (``ridge_fit``)."""

    weight: Tensor  # [dy, dx]
    bias: Tensor  # [dy]
    left_out: Tensor  # [n, dy] out-of-fold residuals
    floor: Tensor  # [dy] the least residual variance of each dim
    ridge: Tensor  # [dy] each dim's penalty
    dof: Tensor  # [dy] effective source dims

    def regularisation(self, shrinkage: float) -> Regularisation:
        return Regularisation(float(self.ridge.median()), float(self.dof.mean()), shrinkage,
                              int((self.left_out.pow(2).mean(0) < self.floor).sum()))


def ridge_fit(source: Tensor, target: Tensor, groups: Tensor | None, variance_floor: float | None,
              least_rows: int = 1) -> RidgeFit:
    """The cross-validated ridge mean of target [N, dt] on source [N, ds] (``_ridge``), its out-of-fold residuals
    and each dim's variance floor (``variance_floor`` of its spread, default VARIANCE_FLOOR): what a full
    (``LinearGaussian``) and a low-rank (``LowRankGaussian``) covariance are then fitted to."""
    variance_floor = VARIANCE_FLOOR if variance_floor is None else variance_floor
    if source.ndim != 2 or target.ndim != 2 or len(source) != len(target) or len(source) < least_rows:
        raise ValueError(f"fit needs source [N, ds] and target [N, dt] with the same N >= {least_rows}, got "
                         f"{tuple(source.shape)}, {tuple(target.shape)}")
    x, y = source.double(), target.double()
    groups = torch.arange(len(x)) if groups is None else torch.as_tensor(groups).long().cpu()
    ridge, left_out = _ridge(x, y, groups.to(x.device))
    x_mean, y_mean = x.mean(0), y.mean(0)
    yc = y - y_mean
    weight, dof = _ridge_fit(x - x_mean, yc, ridge)
    spread = yc.pow(2).mean(0)
    typical = float(spread.mean()) if float(spread.mean()) > 0 else 1.0
    floor = variance_floor * torch.where(spread > 0, spread, typical)
    return RidgeFit(weight, y_mean - weight @ x_mean, left_out, floor, ridge, dof)


@dataclass(frozen=True)
class LinearGaussian(GaussianLaw):
    """p(target | source) = N(W source + b, Sigma): the floor a conditional flow must clear.

    (W, b) is ridge regression, each target dim's penalty chosen by cross-validation over whole groups;
    its mean is the "linear" translation baseline of Maiorca et al. 2023. Sigma is the covariance of
    the out-of-fold residuals, its correlations shrunk and its variances floored (the module's
    docstring says why each). On a well-posed view (many pairs per source dim, no degenerate target
    dim) this is the Gaussian maximum-likelihood law: 1.0546 against its 1.0550 bits/dim held-out on
    50,000 pairs of 384 -> 32 dims (measured). Parameters are
    float64; outputs come back in the dtype of the source given. Fit it on the same units as the
    flow's NLL (standardised source and target, the target's log-determinant added back) and the
    two bits/dim are directly comparable.
    """

    weight: Tensor  # [dy, dx]
    bias: Tensor  # [dy]
    cov: Tensor  # [dy, dy]
    chol: Tensor  # [dy, dy] lower Cholesky factor of cov (jittered only where cov is singular)
    regularisation: Regularisation | None = field(default=None, compare=False)

    @classmethod
    def fit(cls, source: Tensor, target: Tensor, groups: Tensor | None = None,
            variance_floor: float | None = None) -> LinearGaussian:
        """Fit on train pairs: source [N, ds], target [N, dt]. ``groups`` [N] (int): rows that share a
        target (the captions of one image) share a group, and cross-validation holds groups out whole
        (default: every row its own). ``variance_floor``: the least residual variance, as a share of each
        target dim's variance (default VARIANCE_FLOOR)."""
        fit = ridge_fit(source, target, groups, variance_floor)
        groups = torch.arange(len(source)) if groups is None else torch.as_tensor(groups).long().cpu()
        shrinkage = _choose_shrinkage(fit.left_out, fit.floor, groups)
        cov = _covariance(*_moments(fit.left_out), fit.floor, shrinkage)
        return cls(weight=fit.weight, bias=fit.bias, cov=cov, chol=_cholesky(cov),
                   regularisation=fit.regularisation(shrinkage))

    def describe(self) -> str:
        """One line on what this law is, as n2n-train prints it."""
        kind = f"linear-Gaussian law, N(W c + b, Sigma) over {self.dim} dims"
        return kind if self.regularisation is None else f"{kind}: {self.regularisation.describe()}"

    @property
    def dim(self) -> int:
        """Dimensions of the target."""
        return self.weight.shape[0]

    def _mean64(self, source: Tensor) -> Tensor:
        return source.double() @ self.weight.T + self.bias

    def mean(self, source: Tensor) -> Tensor:
        """The least-squares prediction W source + b: [N, ds] -> [N, dt]."""
        return self._mean64(source).to(source.dtype)
