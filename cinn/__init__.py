"""The conditional invertible network (pure torch; ``from_net2net`` reads net2net's files)."""

from n2n.cinn.flow import ActNorm, ConditionalFlow, DoubleAffineCoupling, FlowBlock, FlowConfig, Shuffle
from n2n.cinn.loss import bits_per_dim, nll
from n2n.cinn.net2net import from_net2net

__all__ = ["ActNorm", "ConditionalFlow", "DoubleAffineCoupling", "FlowBlock", "FlowConfig", "Shuffle", "bits_per_dim",
           "from_net2net", "nll"]
