"""The translators (pure torch): both kinds are conditional invertible networks, x <-> z given c with an exact
inverse and a likelihood, which is why the folder keeps the paper's name. The coupling cINN (net2net's) and
the continuous flow (an ODE trained by flow matching) each start from the linear-Gaussian law through their
``linear_stage``; ``from_net2net`` reads net2net's files."""

from n2n.cinn.continuous import ContinuousFlow
from n2n.cinn.flow import ActNorm, ConditionalFlow, DoubleAffineCoupling, FlowBlock, FlowConfig, Shuffle
from n2n.cinn.loss import bits_per_dim, nll
from n2n.cinn.net2net import from_net2net
from n2n.cinn.translators import build_flow, flow_from_dict

__all__ = ["ActNorm", "ConditionalFlow", "ContinuousFlow", "DoubleAffineCoupling", "FlowBlock", "FlowConfig",
           "Shuffle", "bits_per_dim", "build_flow", "flow_from_dict", "from_net2net", "nll"]
