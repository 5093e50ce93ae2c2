"""The linear-Gaussian law as an invertible first stage: both translator kinds start from it.

``LinearGaussian`` (cinn.gaussian) is the simplest conditional density, p(x | c) = N(W c + b, L L^T),
and the floor a translator must clear. As a map it is affine and exactly invertible:

    u = A (x - W c - b),    A = L^-1 (lower triangular),    log|det du/dx| = sum log diag A

so u ~ N(0, I) exactly when x follows that law. Put in front of a flow whose own map starts as the
identity, the translator's NLL at step 0 *is* the floor, and training moves only where the data asks.
Without it a flow starts at N(0, I) in standardised units and must learn the linear part itself:
measured on a view with strong linear structure, 4.7 bits/dim above the floor after 600 steps.

The stage is parametrised in its output's units, u = A x - M c - m (M = A W, m = A b), with A as its
strictly lower part plus exp(log-diagonal), so it stays invertible whatever an optimizer does to it.
Why not W and b themselves: Adam moves every parameter by about its learning rate on its first steps,
whatever the gradient's size. A step of 1e-3 in W moves the mean by ~1e-3 per source dim, which in u is
that times A, up to 1e3 on a dimension that its source nearly determines: measured on a view with
constant and near-determined target dims, the train NLL went from the floor's -8.2 to 3e9 bits/dim in
25 steps at the default learning rate. In u's units a step moves u by ~1e-3 per source dim, whatever A
is, and the NLL is convex in (A, M, m). The forward map (training's direction) is two matrix
products, the reverse (sampling's) one triangular solve.

The law's mean may be an MLP's instead (``cinn.mlp_gaussian``, ``FlowConfig.base = "mlp"``): u = A x - g(c),
g the MLP with its output layer multiplied by A, in u's units for the same reason. The map stays affine in x,
so its inverse and log-determinant are the same.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from n2n.cinn.gaussian import GaussianLaw
from n2n.cinn.lowrank_gaussian import LowRankGaussian
from n2n.cinn.mlp_gaussian import MLPGaussian, mean_mlp


class LinearGaussianStage(nn.Module):
    """x -> u = A x - M c - m (- g(c) with an MLP mean of width ``mean_width``), conditioned on c; the identity
    until ``start_from`` sets a fitted law."""

    def __init__(self, dim: int, cond_dim: int, mean_width: int | None = None) -> None:
        super().__init__()
        self.cond = nn.Parameter(torch.zeros(dim, cond_dim))  # M = A W
        self.offset = nn.Parameter(torch.zeros(dim))  # m = A b
        self.lower = nn.Parameter(torch.zeros(dim, dim))  # A's strictly lower part (the rest is unused)
        self.log_diag = nn.Parameter(torch.zeros(dim))  # log of A's diagonal
        self.mean_net = None if mean_width is None else mean_mlp(cond_dim, dim, mean_width)  # g(c) = A mlp(c)
        if self.mean_net is not None:  # no shift until a law is set
            nn.init.zeros_(self.mean_net[-1].weight)
            nn.init.zeros_(self.mean_net[-1].bias)

    def whitening(self) -> Tensor:
        """A [dim, dim], lower triangular with a positive diagonal."""
        return torch.tril(self.lower, -1) + torch.diag(self.log_diag.exp())

    def shift(self, c: Tensor) -> Tensor:
        """A times the law's mean for c: M c + m, plus g(c) with an MLP mean."""
        shift = c @ self.cond.T + self.offset
        return shift if self.mean_net is None else shift + self.mean_net(c)

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, dim], c [B, cond_dim] -> u [B, dim], log|det du/dx| [B]."""
        u = x @ self.whitening().T - self.shift(c)
        return u, self.log_diag.sum().expand(x.shape[0])

    def reverse(self, u: Tensor, c: Tensor) -> Tensor:
        """The exact inverse: x = A^-1 (u + shift(c))."""
        shifted = u + self.shift(c)
        return torch.linalg.solve_triangular(self.whitening(), shifted.T, upper=False).T

    @torch.no_grad()
    def start_from(self, law: GaussianLaw) -> None:
        """Set this stage to ``law`` (fitted in the units the flow sees: standardised source and target): a
        ``LinearGaussian``, or an ``MLPGaussian`` where the stage has an MLP mean of the law's width."""
        eye = torch.eye(law.dim, dtype=law.chol.dtype, device=law.chol.device)
        inverse = torch.linalg.solve_triangular(law.chol, eye, upper=False)  # A = L^-1, in float64
        if isinstance(law, MLPGaussian) != (self.mean_net is not None):
            raise ValueError("this stage's mean and the law's differ (one is an MLP, the other linear): build the "
                             "translator with the base its law has (FlowConfig.base)")
        if isinstance(law, MLPGaussian):
            self.mean_net.load_state_dict(law.net.state_dict())
            last = self.mean_net[-1]
            last.weight.copy_((inverse @ last.weight.double()).to(last.weight.dtype))
            last.bias.copy_((inverse @ last.bias.double()).to(last.bias.dtype))
            weight, bias = inverse.new_zeros(self.cond.shape), inverse.new_zeros(law.dim)
        else:
            weight, bias = law.weight, law.bias
        for param, value in ((self.cond, inverse @ weight), (self.offset, inverse @ bias),
                             (self.lower, torch.tril(inverse, -1)), (self.log_diag, torch.diagonal(inverse).log())):
            param.copy_(value.to(param.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Read checkpoints written before the stage was parametrised in u's units (``weight`` W, ``bias``
        b): M = A W and m = A b, the same map."""
        if f"{prefix}weight" in state_dict:
            lower, log_diag = state_dict[f"{prefix}lower"], state_dict[f"{prefix}log_diag"]
            a = (torch.tril(lower.double(), -1) + torch.diag(log_diag.double().exp()))
            weight, bias = state_dict.pop(f"{prefix}weight"), state_dict.pop(f"{prefix}bias")
            state_dict[f"{prefix}cond"] = (a @ weight.double()).to(weight.dtype)
            state_dict[f"{prefix}offset"] = (a @ bias.double()).to(bias.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def rename_old_stage(state_dict: dict, prefix: str) -> None:
    """Rename, in place, a translator's state written when this stage was called ``floor`` (a word that also
    names the law's bits/dim and the law itself) to today's ``linear_stage``."""
    old = f"{prefix}floor."
    for key in [key for key in state_dict if key.startswith(old)]:
        state_dict[f"{prefix}linear_stage." + key[len(old):]] = state_dict.pop(key)


class LowRankStage(nn.Module):
    """The first stage for a ``LowRankGaussian`` law (targets wider than ``FULL_WIDTH``): O(d·k), not d².

        u = (I + V (s - 1) V^T) (a * x) - M c - m,    log|det du/dx| = sum log a + sum log s

    a = B^-1 (``log_scale``) and s = (1 + E)^-1/2 (``log_dir``) are trained (for the coupling kind) in log form, so
    they stay positive; V (``basis``, [dim, rank]) is a fixed buffer, so its columns stay orthonormal and the map
    exact. A law with fewer directions than ``rank`` leaves the rest as zero columns with s = 1: inert.
    """

    def __init__(self, dim: int, cond_dim: int, rank: int) -> None:
        super().__init__()
        self.cond = nn.Parameter(torch.zeros(dim, cond_dim))  # M = A W
        self.offset = nn.Parameter(torch.zeros(dim))  # m = A b
        self.log_scale = nn.Parameter(torch.zeros(dim))  # log a
        self.log_dir = nn.Parameter(torch.zeros(rank))  # log s
        self.register_buffer("basis", torch.zeros(dim, rank))  # V

    def shift(self, c: Tensor) -> Tensor:
        """A times the law's mean for c: M c + m."""
        return c @ self.cond.T + self.offset

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, dim], c [B, cond_dim] -> u [B, dim], log|det du/dx| [B]."""
        y = x * self.log_scale.exp()
        u = y + ((y @ self.basis) * torch.expm1(self.log_dir)) @ self.basis.T - self.shift(c)
        return u, (self.log_scale.sum() + self.log_dir.sum()).expand(x.shape[0])

    def reverse(self, u: Tensor, c: Tensor) -> Tensor:
        """The exact inverse: y = (I + V (1/s - 1) V^T) (u + M c + m), x = y / a."""
        w = u + self.shift(c)
        return (w + ((w @ self.basis) * torch.expm1(-self.log_dir)) @ self.basis.T) * (-self.log_scale).exp()

    @torch.no_grad()
    def start_from(self, law: LowRankGaussian) -> None:
        """Set this stage to ``law`` (standardised units), its directions in the first columns."""
        if not isinstance(law, LowRankGaussian) or law.rank > self.basis.shape[1]:
            raise ValueError(f"a low-rank stage of rank {self.basis.shape[1]} takes a LowRankGaussian of at most that "
                             f"rank, got {type(law).__name__}: build the translator with the law its view gets "
                             "(FlowConfig.law)")
        a = 1 / law.scale
        shrink = (1 + law.excess).rsqrt()
        whiten = lambda v: law.whiten(v.T).T  # noqa: E731  (A applied to the columns of v)
        self.cond.copy_(whiten(law.weight).to(self.cond.dtype))
        self.offset.copy_(whiten(law.bias[:, None])[:, 0].to(self.offset.dtype))
        self.log_scale.copy_(a.log().to(self.log_scale.dtype))
        self.log_dir.zero_()
        self.log_dir[: law.rank] = shrink.log().to(self.log_dir.dtype)
        self.basis.zero_()
        self.basis[:, : law.rank] = law.basis.to(self.basis.dtype)
