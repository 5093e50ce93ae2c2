"""The translator kinds by name (``FlowConfig.translator``): one place that builds either.

Both kinds are invertible maps x <-> z given c with a likelihood, and share one interface
(``forward``, ``reverse``, ``sample``, ``loss``, ``draw``, ``start_from``, ``to_dict``), so the
trainer, checkpoints and the translator never ask which one they hold.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from n2n.cinn.continuous import ContinuousFlow
from n2n.cinn.flow import ConditionalFlow, FlowConfig

KINDS: dict[str, type[nn.Module]] = {"coupling": ConditionalFlow, "continuous": ContinuousFlow}


def build_flow(dim: int, cond_dim: int, config: FlowConfig) -> ConditionalFlow | ContinuousFlow:
    """The translator ``config.translator`` names, for a target of ``dim`` given a source of ``cond_dim``."""
    return KINDS[config.translator](dim, cond_dim, config)


def flow_from_dict(spec: dict[str, Any]) -> ConditionalFlow | ContinuousFlow:
    """A translator from ``dim``, ``cond_dim`` and any FlowConfig fields (a checkpoint's ``model`` header,
    through ``upgrade_header`` first), the rest at today's defaults."""
    spec = dict(spec)
    return build_flow(spec.pop("dim"), spec.pop("cond_dim"), FlowConfig(**spec))
