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


PARTS = {"embedder": "embedder", "linear_stage": "first stage", "blocks": "flow blocks", "velocity": "velocity net",
         "null": "null embedding"}  # a translator's children (and own parameters) by the name a person reads
SHRINK = {"embedder": "--embedding-dim", "first stage": "--law lowrank, --law-rank or --base-width (or "
          "--no-start-from-floor)", "flow blocks": "--hidden-dim or --n-flows", "velocity net": "--velocity-width or "
          "--velocity-blocks", "null embedding": "--embedding-dim"}  # the options that shrink each part


def parameter_parts(flow: nn.Module) -> dict[str, int]:
    """A translator's parameters by part (``PARTS``: flow blocks, embedder, first stage, velocity net), largest
    first: n2n-train --dry-run's rows, and what its out-of-memory message names."""
    parts: dict[str, int] = {}
    for name, param in flow.named_parameters():
        part = PARTS.get(name.split(".")[0], name.split(".")[0])
        parts[part] = parts.get(part, 0) + param.numel()
    return dict(sorted(parts.items(), key=lambda item: -item[1]))


def build_flow(dim: int, cond_dim: int, config: FlowConfig) -> ConditionalFlow | ContinuousFlow:
    """The translator ``config.translator`` names, for a target of ``dim`` given a source of ``cond_dim``."""
    return KINDS[config.translator](dim, cond_dim, config)


def flow_from_dict(spec: dict[str, Any]) -> ConditionalFlow | ContinuousFlow:
    """A translator from ``dim``, ``cond_dim`` and any FlowConfig fields (a checkpoint's ``model`` header,
    through ``upgrade_header`` first), the rest at today's defaults."""
    spec = dict(spec)
    return build_flow(spec.pop("dim"), spec.pop("cond_dim"), FlowConfig(**spec))
