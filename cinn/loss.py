"""Negative log-likelihood of a flow's output under N(0, I), with the Gaussian constant.

net2net trains on 0.5 * |z|^2 - logdet (no constant); that is fine for gradients but not a number
anyone can compare. Here the NLL is the true -log p(x | c) in nats, and bits/dim divides it by
dim * ln 2, so runs of different latent sizes and the analytic NLL of a known law line up.
"""

from __future__ import annotations

import math

from torch import Tensor

LOG_2PI = math.log(2 * math.pi)


def nll(z: Tensor, logdet: Tensor) -> Tensor:
    """Per-sample -log p(x | c) in nats: [B, D], [B] -> [B]."""
    return 0.5 * z.pow(2).sum(1) + 0.5 * z.shape[1] * LOG_2PI - logdet


def bits_per_dim(nll_nats: Tensor | float, dim: int) -> Tensor | float:
    """Convert an NLL in nats (per sample) to bits per dimension."""
    return nll_nats / (dim * math.log(2))
