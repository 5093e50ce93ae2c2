"""The conditional invertible network (pure torch, no I/O)."""

from cinn.flow import ActNorm, ConditionalFlow, DoubleAffineCoupling, FlowBlock, Shuffle
from cinn.loss import bits_per_dim, nll

__all__ = ["ActNorm", "ConditionalFlow", "DoubleAffineCoupling", "FlowBlock", "Shuffle", "bits_per_dim", "nll"]
