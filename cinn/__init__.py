"""The conditional invertible network (pure torch, no I/O)."""

from n2n.cinn.flow import ActNorm, ConditionalFlow, DoubleAffineCoupling, FlowBlock, FlowConfig, Shuffle
from n2n.cinn.loss import bits_per_dim, nll

__all__ = ["ActNorm", "ConditionalFlow", "DoubleAffineCoupling", "FlowBlock", "FlowConfig", "Shuffle", "bits_per_dim",
           "nll"]
