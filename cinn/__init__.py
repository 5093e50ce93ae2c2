"""The invertible translators (pure torch): the coupling cINN and the continuous flow, both started
from the linear-Gaussian law; ``from_net2net`` reads net2net's files."""

from n2n.cinn.continuous import ContinuousFlow
from n2n.cinn.flow import ActNorm, ConditionalFlow, DoubleAffineCoupling, FlowBlock, FlowConfig, Shuffle
from n2n.cinn.loss import bits_per_dim, nll
from n2n.cinn.net2net import from_net2net
from n2n.cinn.translators import build_flow, flow_from_dict

__all__ = ["ActNorm", "ConditionalFlow", "ContinuousFlow", "DoubleAffineCoupling", "FlowBlock", "FlowConfig",
           "Shuffle", "bits_per_dim", "build_flow", "flow_from_dict", "from_net2net", "nll"]
